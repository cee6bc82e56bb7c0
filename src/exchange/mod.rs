//! RFC 8693 token exchange with a single-flight cache.
//!
//! For every validated request the proxy calls [`Exchanger::exchange`] with the client's token
//! (the *subject token*). The answer is the `Authorization` value for the backend:
//!
//! 1. **Cache hit** (the hot path): one SHA-256 over the subject token (the parameter part of
//!    the key is precomputed), one lookup in a [`moka`] cache, one [`HeaderValue`] clone.
//! 2. **Miss**: one POST to the token endpoint ([`request`]), authenticated as configured
//!    ([`client_auth`]); the answer is checked ([`response`]) and cached for the earliest of
//!    the issued token's, the subject token's and `cache.max_ttl`'s end, minus
//!    `cache.expiry_margin` (module `cache`). Concurrent misses for one key make one call
//!    (moka's `try_get_with`); the others wait for it and share its result, success or failure
//!    (failures are never kept).
//! 3. A [`breaker`] stops calling an IdP that keeps failing and answers `Unavailable` at once.
//!
//! Failures are split by whose fault they are ([`ExchangeError`], README "HTTP behaviour").
//! The token endpoint comes from `exchange.token_endpoint`, else from discovery of
//! `exchange.issuer`, retried in the background; until it is known `/readyz` reports
//! `token_endpoint` pending and exchanges answer `Unavailable`.
//!
//! Decisions beyond the RFCs:
//! - An exchange whose cacheable window is empty (the subject token or the issued token
//!   expires within `expiry_margin`) is still used, for the request that made it and any
//!   requests coalesced onto it, but is not kept: refusing a client whose token is still
//!   valid would be worse than handing the backend a short-lived token.
//! - An issued token that is already expired (`expires_in: 0`, or a past `exp`) is unusable.
//! - A 4xx with an unknown or missing `error` code, and any 401/403, is the proxy's side
//!   (`ClientRejected`, 502); see `response::classify`.
//! - A secret or key file that cannot be read at request time is `ClientRejected` (502) and
//!   logged with the file's path; at start-up it fails [`Exchanger::new`].

pub mod breaker;
mod cache;
pub mod client_auth;
pub mod layer;
pub mod request;
pub mod response;
mod store;

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::HeaderValue;
use tokio::time::Instant;
use url::Url;

use crate::config::VerifyIssued;
use crate::config::{Cache, Exchange, Grant};
use crate::idp::{self, IdpClient, IdpError};
use crate::inbound::claims::Claims;
use crate::inbound::{Principal, Unverified, Validator};
use crate::metrics::{ExchangeResult, Metrics, RefreshResult};
use crate::readiness::Readiness;

use breaker::{Breaker, Health};
pub use breaker::{BreakerSettings, BreakerState};
pub use cache::CacheKey;
use cache::{CachedToken, KeyDeriver};
use client_auth::ClientAuthenticator;
pub use client_auth::CredentialError;
pub use layer::{TokenExchange, TokenExchangeLayer};
use request::FormTemplate;
use response::{Refusal, Unusable};
use store::{Refusals, Store};

/// The `/readyz` item pending until the token endpoint is known.
pub const READINESS_ITEM: &str = "token_endpoint";
/// The `/readyz` item while the token endpoint refuses the proxy's own client.
pub const CREDENTIALS_REJECTED: &str = "token_endpoint: credentials rejected";
/// The subject token of the credentials probe: no IdP can accept it, so the answer says
/// only whether the IdP accepts the proxy's own client (`.invalid` is reserved, RFC 2606).
pub const PROBE_SUBJECT: &str = "token-exchange-proxy-probe.invalid";
/// Longest wait between two credentials probes while the IdP refuses the proxy's client.
pub const PROBE_RETRY_MAX: Duration = Duration::from_secs(30);
/// First wait before retrying a failed discovery of the token endpoint.
pub const DISCOVERY_RETRY_MIN: Duration = Duration::from_secs(1);
/// Longest wait between discovery attempts: an IdP that comes up is noticed within this.
pub const DISCOVERY_RETRY_MAX: Duration = Duration::from_secs(30);

/// Where an exchanged token came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheStatus {
    /// Served from the cache.
    Hit,
    /// This request called the IdP.
    Miss,
    /// This request waited for another request's call for the same key.
    Coalesced,
    /// Served past its serving window: the IdP was unavailable (`cache.stale_if_error`).
    Stale,
}

impl CacheStatus {
    /// As written in the access log.
    pub fn as_str(self) -> &'static str {
        match self {
            CacheStatus::Hit => "hit",
            CacheStatus::Miss => "miss",
            CacheStatus::Coalesced => "coalesced",
            CacheStatus::Stale => "stale",
        }
    }
}

/// An exchanged token, ready to be sent.
#[derive(Debug, Clone)]
pub struct Exchanged {
    /// `Bearer <token>`, marked sensitive.
    pub authorization: HeaderValue,
    pub cache: CacheStatus,
    /// The subject token's `sub`, for the access log.
    pub sub: Option<Arc<str>>,
}

impl Exchanged {
    fn from_entry(entry: CachedToken, cache: CacheStatus) -> Self {
        Self {
            authorization: entry.authorization,
            cache,
            sub: entry.sub,
        }
    }
}

/// Why an exchange failed, split by whose fault it is (README "HTTP behaviour").
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExchangeError {
    /// The IdP refused the subject token: 401 `invalid_token`.
    #[error("the IdP rejected the subject token")]
    SubjectRejected,
    /// The IdP refused the requested scope: 403 `insufficient_scope`. `scope` is the
    /// configured `exchange.scope`, the scope that was asked for.
    #[error("the IdP rejected the requested scope")]
    ScopeRejected { scope: Option<String> },
    /// The IdP wants a token with more claims (Entra's Conditional Access): 401
    /// `insufficient_claims` with the claims request, base64-encoded, for the client to
    /// take to the IdP.
    #[error("the IdP requires more claims")]
    ClaimsRequired { claims: Arc<str> },
    /// The IdP refused the proxy's own credentials (or they could not be read): 502.
    #[error("the IdP rejected the proxy's client credentials")]
    ClientRejected,
    /// The IdP is unreachable, slow, or answered 5xx/429, or the circuit is open: 503 with
    /// `Retry-After`.
    #[error("the IdP is unavailable")]
    Unavailable { retry_after: Duration },
    /// The IdP answered 200 with something unusable: 502.
    #[error("the IdP's response was unusable")]
    InvalidResponse,
}

/// What the credentials probe found wrong ([`Exchanger::probe`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProbeError {
    /// The IdP refused the proxy's own client: it cannot exchange (`invalid_client`,
    /// `unauthorized_client`, `unsupported_grant_type`, or HTTP 401).
    #[error("credentials rejected ({0})")]
    CredentialsRejected(String),
    /// No answer that says anything: unreachable, timing out, or failing (5xx, 429).
    #[error("{0}")]
    Unavailable(String),
    /// The token endpoint is not configured and discovery does not name it.
    #[error("not known: {0}")]
    Unknown(String),
    /// A credential file of `exchange.client_auth` cannot be used.
    #[error("{0}")]
    Credentials(String),
}

/// Why the exchanger could not be set up (a start-up failure).
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// A secret or key file named in `exchange.client_auth` is unreadable or unusable.
    #[error("exchange.client_auth: {0}")]
    Credentials(#[from] CredentialError),
}

/// Settings that have no config key (there are none); tests shorten them.
#[derive(Debug, Clone)]
pub struct ExchangerOptions {
    /// Circuit breaker thresholds; default [`breaker::DEFAULT_FAILURE_THRESHOLD`] failures,
    /// [`breaker::DEFAULT_COOL_DOWN`].
    pub breaker: BreakerSettings,
    /// First wait before retrying discovery (and the credentials probe); doubles up to
    /// [`DISCOVERY_RETRY_MAX`].
    pub discovery_retry: Duration,
    /// Whether [`Exchanger::start`] probes the token endpoint with the proxy's credentials.
    pub probe: bool,
}

impl Default for ExchangerOptions {
    fn default() -> Self {
        Self {
            breaker: BreakerSettings::default(),
            discovery_retry: DISCOVERY_RETRY_MIN,
            probe: true,
        }
    }
}

/// Exchanges subject tokens, with a cache.
pub struct Exchanger {
    /// The profile this exchanger serves (its index in the config).
    profile: usize,
    /// `exchange.grant`.
    grant: Grant,
    /// Its `/readyz` items: the token endpoint unknown, and its client refused.
    ready_endpoint: String,
    ready_credentials: String,
    cache: Store,
    /// Subject tokens the IdP refused, remembered for `exchange.negative_ttl`.
    refusals: Refusals,
    /// Bounds the calls to the token endpoint in flight (`exchange.max_concurrent`).
    calls: tokio::sync::Semaphore,
    keys: KeyDeriver,
    form: FormTemplate,
    auth: ClientAuthenticator,
    /// Configured, or set once by discovery.
    endpoint: OnceLock<Url>,
    issuer: String,
    scope: Option<String>,
    requested_token_type: String,
    timeout: Duration,
    max_ttl: Duration,
    expiry_margin: Duration,
    refresh_ahead: Duration,
    stale_if_error: bool,
    /// `None` with `exchange.verify_issued: never` (or no keys given).
    issued: Option<IssuedCheck>,
    breaker: Breaker,
    options: ExchangerOptions,
    idp: IdpClient,
    metrics: Arc<Metrics>,
    readiness: Arc<Readiness>,
}

impl fmt::Debug for Exchanger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Exchanger")
            .field("token_endpoint", &self.endpoint.get().map(Url::as_str))
            .field("auth", &self.auth)
            .field("entries", &self.cache.len())
            .field("breaker", &self.breaker.state())
            .finish_non_exhaustive()
    }
}

impl Exchanger {
    /// Builds the exchanger; registers what `/readyz` waits for. Fails if a file named in
    /// `exchange.client_auth` cannot be read (or the private key parsed).
    pub fn new(
        config: &Exchange,
        cache: &Cache,
        idp: IdpClient,
        metrics: Arc<Metrics>,
        readiness: Arc<Readiness>,
    ) -> Result<Self, SetupError> {
        Self::with_options(
            config,
            cache,
            idp,
            metrics,
            readiness,
            ExchangerOptions::default(),
        )
    }

    /// [`Exchanger::new`] with non-default [`ExchangerOptions`].
    pub fn with_options(
        config: &Exchange,
        cache: &Cache,
        idp: IdpClient,
        metrics: Arc<Metrics>,
        readiness: Arc<Readiness>,
        options: ExchangerOptions,
    ) -> Result<Self, SetupError> {
        Self::for_profile(config, cache, idp, metrics, readiness, options, 0, "")
    }

    /// [`Exchanger::with_options`] for profile `index` named `name` (README "Several
    /// issuers"): its cache keys include the name, its metrics carry it, and its `/readyz`
    /// items are prefixed with it (`corp/token_endpoint`).
    #[expect(clippy::too_many_arguments, reason = "one constructor for every form")]
    pub fn for_profile(
        config: &Exchange,
        cache: &Cache,
        idp: IdpClient,
        metrics: Arc<Metrics>,
        readiness: Arc<Readiness>,
        options: ExchangerOptions,
        index: usize,
        name: &str,
    ) -> Result<Self, SetupError> {
        let auth = ClientAuthenticator::new(&config.client_id, &config.client_auth)?;
        let endpoint = OnceLock::new();
        let prefix = if name.is_empty() {
            String::new()
        } else {
            format!("{name}/")
        };
        let ready_endpoint = format!("{prefix}{READINESS_ITEM}");
        match &config.token_endpoint {
            Some(url) => {
                let _ = endpoint.set(url.clone());
            }
            None => readiness.pending(ready_endpoint.as_str()),
        }
        Ok(Self {
            profile: index,
            grant: config.grant,
            ready_endpoint,
            ready_credentials: format!("{prefix}{CREDENTIALS_REJECTED}"),
            cache: Store::new(cache.max_entries),
            refusals: Refusals::new(cache.max_entries, config.negative_ttl),
            calls: tokio::sync::Semaphore::new(config.max_concurrent),
            keys: KeyDeriver::new(config, name),
            form: FormTemplate::new(config),
            auth,
            endpoint,
            issuer: config.issuer.clone(),
            scope: config.scope.clone(),
            requested_token_type: config.requested_token_type.clone(),
            timeout: config.timeout,
            max_ttl: cache.max_ttl,
            expiry_margin: cache.expiry_margin,
            refresh_ahead: cache.refresh_ahead,
            stale_if_error: cache.stale_if_error,
            issued: None,
            breaker: Breaker::new(options.breaker),
            options,
            idp,
            metrics,
            readiness,
        })
    }

    /// Starts background work: discovery of the token endpoint when none is configured,
    /// retried with exponential backoff until it succeeds; it ends when the exchanger is
    /// dropped.
    pub fn start(self: &Arc<Self>) {
        if self.options.probe {
            tokio::spawn(probe_until_accepted(
                Arc::downgrade(self),
                self.options.discovery_retry,
            ));
        }
        if self.endpoint.get().is_some() {
            return;
        }
        let weak = Arc::downgrade(self);
        let first = self.options.discovery_retry;
        tokio::spawn(discover_until_known(weak, first));
    }

    /// Sends one token exchange with a subject token no IdP can accept ([`PROBE_SUBJECT`]):
    /// the answer tells whether the IdP accepts the proxy's own client. Refused subject
    /// (`invalid_grant`, `invalid_request`, …): the credentials are fine. Nothing is cached,
    /// counted or fed to the circuit breaker (README "Start-up and online checks").
    pub async fn probe(&self) -> Result<(), ProbeError> {
        let endpoint = match self.endpoint.get() {
            Some(url) => url.clone(),
            None => idp::discover(&self.idp, &self.issuer, None)
                .await
                .map_err(|e| ProbeError::Unknown(format!("{e}")))?
                .token_endpoint
                .ok_or_else(|| {
                    ProbeError::Unknown("the discovery document names no token_endpoint".into())
                })?,
        };
        let credentials = self
            .auth
            .credentials(&endpoint)
            .await
            .map_err(|e| ProbeError::Credentials(e.to_string()))?;
        let body = self.form.body(PROBE_SUBJECT, &credentials.params);
        let answer = request::post(
            self.idp.http(),
            &endpoint,
            body,
            credentials.authorization,
            None,
            self.timeout,
        )
        .await
        .map_err(|e| ProbeError::Unavailable(format!("{e}: {}", causes(&e))))?;
        let code = answer
            .body
            .as_deref()
            .and_then(response::error_code)
            .map(|c| response::sanitize_code(&c));
        let status = answer.status;
        if status.is_server_error() || status == http::StatusCode::TOO_MANY_REQUESTS {
            return Err(ProbeError::Unavailable(format!("HTTP {}", status.as_u16())));
        }
        match code.as_deref() {
            Some(c @ ("invalid_client" | "unauthorized_client" | "unsupported_grant_type")) => {
                Err(ProbeError::CredentialsRejected(c.to_owned()))
            }
            _ if status == http::StatusCode::UNAUTHORIZED => Err(ProbeError::CredentialsRejected(
                code.unwrap_or_else(|| "HTTP 401".into()),
            )),
            _ => Ok(()),
        }
    }

    /// Verifies every issued token with `keys`, the exchange issuer's, as
    /// `config.verify_issued` asks: nothing with `never`, nor with `auto` for On-Behalf-Of
    /// ([`verifies_issued`]).
    pub fn verifying_issued_with(mut self, config: &Exchange, keys: Arc<Validator>) -> Self {
        self.issued = verifies_issued(config).then(|| IssuedCheck {
            mode: config.verify_issued,
            keys,
            issuer: config.issuer.clone(),
            audiences: config
                .audience
                .iter()
                .chain(&config.resource)
                .cloned()
                .collect(),
        });
        self
    }

    /// The token endpoint, once known.
    pub fn token_endpoint(&self) -> Option<&Url> {
        self.endpoint.get()
    }

    /// The circuit breaker's state.
    pub fn breaker_state(&self) -> BreakerState {
        self.breaker.state()
    }

    /// Exchanges `subject` (a validated client token expiring at `subject_expires_at`,
    /// seconds since the Unix epoch). The result is cached but rests on no acceptance, so
    /// [`Exchanger::cached`] does not serve it.
    pub async fn exchange(
        self: &Arc<Self>,
        subject: &str,
        subject_expires_at: Option<u64>,
    ) -> Result<Exchanged, ExchangeError> {
        let principal = Principal {
            sub: None,
            expires_at: subject_expires_at,
            trusted_until: None,
            key_epoch: 0,
            profile: self.profile,
        };
        self.exchange_keyed(subject, &self.key(subject), &principal)
            .await
    }

    /// The cache key of `subject` (README "Caches, refreshes and the IdP circuit": SHA-256
    /// over the length-prefixed exchange parameters and the subject token).
    pub fn key(&self, subject: &str) -> CacheKey {
        self.keys.key(subject.as_bytes())
    }

    /// [`Exchanger::key`] of the subject token whose SHA-256 digest is `subject_digest`.
    pub fn key_of(&self, subject_digest: &[u8; 32]) -> CacheKey {
        self.keys.key_of(subject_digest)
    }

    /// The profile this exchanger serves (its index in the config).
    pub fn profile(&self) -> usize {
        self.profile
    }

    /// The hot path: the cached exchange for a subject token seen before (by its
    /// [`Exchanger::key`]), served without validating the token again while the validation
    /// the entry rests on holds: not past its [`Principal::trusted_until`] and made in the
    /// validator's current `key_epoch` ([`crate::inbound::Validator::key_epoch`]). `None`:
    /// validate the token, then call [`Exchanger::exchange_keyed`].
    pub async fn cached(&self, key: &CacheKey, key_epoch: u64) -> Option<Exchanged> {
        self.recall_entry(key, key_epoch)
            .await
            .map(|entry| Exchanged::from_entry(entry, CacheStatus::Hit))
    }

    /// [`Exchanger::cached`], with the acceptance the entry rests on.
    async fn recall_entry(&self, key: &CacheKey, key_epoch: u64) -> Option<CachedToken> {
        let entry = self.cache.get(key).await?;
        let now = Instant::now();
        if !(entry.is_servable(now) && entry.is_trusted(now, key_epoch)) {
            return None;
        }
        Metrics::inc(&self.metrics.cache_hits);
        Some(entry)
    }

    /// [`Exchanger::exchange`] for a subject the validator has just accepted as `principal`,
    /// whose [`Exchanger::key`] the caller already has (`key` must be that subject's). The
    /// entry rests on that acceptance, so [`Exchanger::cached`] serves it while it holds; a
    /// cached entry whose acceptance had lapsed is renewed with this one.
    ///
    /// When the IdP is unavailable and `cache.stale_if_error` is on, an entry past its
    /// serving window but within its lifetime is served rather than failing.
    pub async fn exchange_keyed(
        self: &Arc<Self>,
        subject: &str,
        key: &CacheKey,
        principal: &Principal,
    ) -> Result<Exchanged, ExchangeError> {
        self.exchange_traced(subject, key, principal, None).await
    }

    /// [`Exchanger::exchange_keyed`], whose call to the IdP (if one is made) carries
    /// `propagation`: the `traceparent` of the exchange's span (README "Traces").
    pub async fn exchange_traced(
        self: &Arc<Self>,
        subject: &str,
        key: &CacheKey,
        principal: &Principal,
        propagation: Option<&http::HeaderMap>,
    ) -> Result<Exchanged, ExchangeError> {
        let key = *key;
        let now = Instant::now();
        let current = self.cache.get(&key).await;
        if let Some(entry) = current.as_ref().filter(|e| e.is_servable(now)) {
            Metrics::inc(&self.metrics.cache_hits);
            if !entry.is_trusted(now, principal.key_epoch)
                && principal.trusted(now, principal.key_epoch)
            {
                self.cache.insert(key, entry.retrusted(principal)).await;
            }
            self.refresh_if_due(&key, subject, entry, now);
            return Ok(Exchanged::from_entry(entry.clone(), CacheStatus::Hit));
        }
        // Refused a moment ago: the same answer, without asking the IdP again.
        if let Some(refused) = self.refusals.get(&key, now).await {
            return Err(refused);
        }
        // Single flight: concurrent callers for this key wait for one exchange and share its
        // result, a failure included.
        let called = AtomicBool::new(false);
        let result = self
            .cache
            .flight(key, async {
                called.store(true, Ordering::Relaxed);
                self.exchange_and_keep(key, subject, principal, propagation)
                    .await
            })
            .await;
        let result = result.map_err(|e| (*e).clone());
        if let (Err(ExchangeError::Unavailable { .. }), true, Some(stale)) =
            (&result, self.stale_if_error, &current)
            && stale.is_stale(Instant::now())
        {
            Metrics::inc(&self.metrics.stale_served);
            tracing::info!(
                "token exchange: the IdP is unavailable; serving a cached token past its expiry margin"
            );
            return Ok(Exchanged::from_entry(stale.clone(), CacheStatus::Stale));
        }
        let status = if called.load(Ordering::Relaxed) {
            Metrics::inc(&self.metrics.cache_misses);
            CacheStatus::Miss
        } else {
            Metrics::inc(&self.metrics.cache_coalesced);
            CacheStatus::Coalesced
        };
        result.map(|entry| Exchanged::from_entry(entry, status))
    }

    /// One exchange at the IdP whose result is kept: a token in the cache, a refusal of the
    /// subject among the refusals.
    async fn exchange_and_keep(
        &self,
        key: CacheKey,
        subject: &str,
        principal: &Principal,
        propagation: Option<&http::HeaderMap>,
    ) -> Result<CachedToken, ExchangeError> {
        let outcome = self.call_idp(subject, principal, propagation).await;
        match &outcome {
            Ok(entry) => self.cache.keep(key, entry.clone(), Instant::now()).await,
            Err(
                e @ (ExchangeError::SubjectRejected
                | ExchangeError::ScopeRejected { .. }
                | ExchangeError::ClaimsRequired { .. }),
            ) => {
                self.refusals.insert(key, e.clone(), Instant::now()).await;
            }
            Err(_) => {}
        }
        outcome
    }

    /// Starts the background refresh of `entry` (for `subject`, under `key`) when it is due
    /// and no request started it before: one exchange, in the single flight of its key, whose
    /// token replaces the entry if it serves longer. Requests go on using `entry` meanwhile; a
    /// failure leaves it in place.
    pub(crate) fn refresh_if_due(
        self: &Arc<Self>,
        key: &CacheKey,
        subject: &str,
        entry: &CachedToken,
        now: Instant,
    ) {
        if !entry.claim_refresh(now) {
            return;
        }
        let this = self.clone();
        let key = *key;
        let subject = secrecy::SecretString::from(subject);
        let principal = entry.principal();
        tokio::spawn(async move {
            use secrecy::ExposeSecret as _;
            let result = this
                .cache
                .flight(
                    key,
                    this.exchange_and_keep(key, subject.expose_secret(), &principal, None),
                )
                .await;
            let outcome = match result {
                Ok(_) => RefreshResult::Success,
                Err(_) => RefreshResult::Failure,
            };
            this.metrics.exchange_refreshes.inc(outcome);
        });
    }

    /// Forgets the cached exchanges of client tokens whose `sub` is `sub` (`None`: all of
    /// them); returns how many were removed (README "Admin endpoints").
    pub async fn purge(&self, sub: Option<&str>) -> u64 {
        self.cache.purge(sub).await
    }

    /// Forgets the cached exchange of `subject` (a client token found revoked).
    pub async fn forget(&self, subject: &str) {
        self.cache.forget(&self.key(subject)).await;
    }

    /// Entries currently cached, as of the last [`Exchanger::sync`] (the cache applies
    /// evictions and expiries in batches).
    pub fn entry_count(&self) -> u64 {
        self.cache.len()
    }

    /// Applies the cache's pending evictions and expiries now.
    pub async fn sync(&self) {
        self.cache.sync().await;
    }

    /// One call to the token endpoint, with its metrics, logs and breaker bookkeeping.
    async fn call_idp(
        &self,
        subject: &str,
        principal: &Principal,
        propagation: Option<&http::HeaderMap>,
    ) -> Result<CachedToken, ExchangeError> {
        let Some(endpoint) = self.endpoint.get() else {
            tracing::debug!("token exchange: the token endpoint is not known yet");
            self.metrics
                .exchange_requests
                .inc_for(Some(self.profile), ExchangeResult::Unavailable);
            return Err(ExchangeError::Unavailable {
                retry_after: response::DEFAULT_RETRY_AFTER,
            });
        };
        // One deadline for the wait for a call slot and the call together: a request waits
        // for the IdP no longer than `exchange.timeout` in all (README "Caches, refreshes and
        // the IdP circuit").
        let deadline = Instant::now() + self.timeout;
        let permit = match self.breaker.try_acquire(Instant::now()) {
            Ok(p) => p,
            Err(wait) => return Err(self.unavailable(wait)),
        };
        // At most `exchange.max_concurrent` calls at once; the others wait their turn, within
        // the deadline.
        let Ok(Ok(_slot)) = tokio::time::timeout_at(deadline, self.calls.acquire()).await else {
            tracing::warn!(
                "token exchange: exchange.max_concurrent calls in flight; no slot within exchange.timeout"
            );
            return Err(self.unavailable(response::DEFAULT_RETRY_AFTER));
        };
        // The circuit may have opened while this call waited for its slot (the calls ahead of
        // it failed): then it is not made either.
        if let Err(wait) = permit.still_allowed(Instant::now()) {
            return Err(self.unavailable(wait));
        }
        let _inflight = Inflight::count(&self.metrics);
        let credentials = match self.auth.credentials(endpoint).await {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "token exchange: the client credentials cannot be used");
                self.metrics
                    .exchange_requests
                    .inc_for(Some(self.profile), ExchangeResult::ClientError);
                return Err(ExchangeError::ClientRejected);
            }
        };
        let body = self.form.body(subject, &credentials.params);
        drop(credentials.params);
        let started = std::time::Instant::now();
        let answer = request::post(
            self.idp.http(),
            endpoint,
            body,
            credentials.authorization,
            propagation,
            deadline.saturating_duration_since(Instant::now()),
        )
        .await;
        self.metrics.exchange_duration.observe(started.elapsed());

        let (outcome, health) = self.judge(answer, principal);
        permit.record(health, Instant::now());
        let outcome = match outcome {
            Ok(entry) => self.check_issued(entry).await,
            failed => failed,
        };
        self.metrics.exchange_requests.inc_for(
            Some(self.profile),
            match &outcome {
                Ok(_) => ExchangeResult::Success,
                Err(
                    ExchangeError::SubjectRejected
                    | ExchangeError::ScopeRejected { .. }
                    | ExchangeError::ClaimsRequired { .. },
                ) => ExchangeResult::Rejected,
                Err(ExchangeError::ClientRejected) => ExchangeResult::ClientError,
                Err(ExchangeError::Unavailable { .. }) => ExchangeResult::Unavailable,
                Err(ExchangeError::InvalidResponse) => ExchangeResult::InvalidResponse,
            },
        );
        outcome
    }

    /// An exchange not attempted because the IdP is unavailable: counted, and answered 503
    /// with `Retry-After` = `wait` in whole seconds.
    fn unavailable(&self, wait: Duration) -> ExchangeError {
        self.metrics
            .exchange_requests
            .inc_for(Some(self.profile), ExchangeResult::Unavailable);
        ExchangeError::Unavailable {
            retry_after: response::whole_seconds(wait),
        }
    }

    /// The issued token, verified as `exchange.verify_issued` asks (README "Caches, refreshes
    /// and the IdP circuit"): signed by a key of the exchange issuer's JWKS, `exp` in the
    /// future (no leeway: it is fresh from the IdP), `iss` the exchange issuer, and `aud`
    /// naming every configured `exchange.audience` and `exchange.resource`. A token that fails
    /// is an unusable answer (502), never cached.
    async fn check_issued(&self, entry: CachedToken) -> Result<CachedToken, ExchangeError> {
        let Some(check) = &self.issued else {
            return Ok(entry);
        };
        let token = entry
            .authorization
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or_default();
        let failure = match check.keys.verify_signed(token).await {
            Ok(claims) => check.judge(&claims, SystemTime::now()).err(),
            Err(Unverified::NotJwt | Unverified::NoKeys) if check.mode == VerifyIssued::Auto => {
                None
            }
            Err(Unverified::NotJwt) => Some("not a JWT"),
            Err(Unverified::NoKeys) => Some("the exchange issuer's keys are not loaded"),
            Err(Unverified::Invalid(why)) => Some(why),
        };
        match failure {
            None => Ok(entry),
            Some(why) => {
                tracing::warn!(
                    reason = why,
                    "token exchange: the issued token failed verification"
                );
                Err(ExchangeError::InvalidResponse)
            }
        }
    }

    /// Turns the IdP's answer into a cache entry or an error, logging why, with what it told
    /// about the IdP (for the breaker).
    fn judge(
        &self,
        answer: Result<request::Answer, IdpError>,
        principal: &Principal,
    ) -> (Result<CachedToken, ExchangeError>, Health) {
        let answer = match answer {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(
                    error = %e,
                    cause = %causes(&e),
                    "token exchange: the IdP cannot be reached"
                );
                let retry_after = response::DEFAULT_RETRY_AFTER;
                return (
                    Err(ExchangeError::Unavailable { retry_after }),
                    Health::Down,
                );
            }
        };
        let status = answer.status.as_u16();
        if answer.status.is_success() {
            let issued = answer
                .body
                .as_deref()
                .ok_or(Unusable::TooLarge)
                .and_then(|body| {
                    // On-Behalf-Of answers carry no issued_token_type.
                    let requested = (self.grant == Grant::TokenExchange)
                        .then_some(self.requested_token_type.as_str());
                    response::parse_success(body, requested, SystemTime::now())
                });
            return match issued {
                Ok(issued) => (Ok(self.entry(issued, principal)), Health::Up),
                Err(why) => {
                    tracing::warn!(
                        status,
                        reason = why.as_str(),
                        "token exchange: the IdP's response is unusable"
                    );
                    (Err(ExchangeError::InvalidResponse), Health::Up)
                }
            };
        }
        let error = answer
            .body
            .as_deref()
            .map(response::error_body)
            .unwrap_or_default();
        let logged = error
            .error
            .as_deref()
            .map(response::sanitize_code)
            .unwrap_or_default();
        let refusal = match self.grant {
            Grant::TokenExchange => response::classify(answer.status, error.error.as_deref()),
            Grant::JwtBearerObo => response::classify_obo(answer.status, &error),
        };
        match refusal {
            Refusal::Subject => {
                tracing::info!(status, error = %logged, "token exchange: the IdP rejected the subject token");
                (Err(ExchangeError::SubjectRejected), Health::Up)
            }
            Refusal::Claims(claims) => {
                tracing::info!(status, error = %logged, "token exchange: the IdP requires more claims (Conditional Access)");
                (
                    Err(ExchangeError::ClaimsRequired {
                        claims: claims.into(),
                    }),
                    Health::Up,
                )
            }
            Refusal::Scope => {
                tracing::info!(status, error = %logged, suberror = %error.suberror.as_deref().map(response::sanitize_code).unwrap_or_default(), "token exchange: the IdP rejected the scope");
                (
                    Err(ExchangeError::ScopeRejected {
                        scope: self.scope.clone(),
                    }),
                    Health::Up,
                )
            }
            Refusal::Client => {
                tracing::error!(status, error = %logged, "token exchange: the IdP rejected the proxy's client");
                // Counts toward the circuit: a wrong secret must not send every request to
                // the IdP (which may lock the client out for it).
                (Err(ExchangeError::ClientRejected), Health::Down)
            }
            Refusal::Unavailable => {
                let asked =
                    response::retry_after_sent(answer.retry_after.as_ref(), SystemTime::now());
                let retry_after = asked.unwrap_or(response::DEFAULT_RETRY_AFTER);
                tracing::warn!(status, error = %logged, "token exchange: the IdP is unavailable");
                let health = asked.map_or(Health::Down, Health::Resting);
                (Err(ExchangeError::Unavailable { retry_after }), health)
            }
        }
    }

    /// The cache entry for an issued token (README "Caches, refreshes and the IdP circuit": earliest end, minus the margin),
    /// resting on the subject's acceptance.
    fn entry(&self, issued: response::Issued, principal: &Principal) -> CachedToken {
        let subject = principal
            .expires_at
            .map(|exp| cache::remaining_until(exp, SystemTime::now()));
        let lifetime = cache::entry_lifetime(issued.lifetime, subject, self.max_ttl);
        let window = cache::serve_window(lifetime, self.expiry_margin);
        if window.is_zero() {
            tracing::debug!(
                lifetime_ms = lifetime.as_millis() as u64,
                "token exchange: the token expires within the expiry margin; used once, not cached"
            );
            // Not kept: the store lets an entry go at the end of its lifetime.
            return CachedToken::new(
                issued.authorization,
                Duration::ZERO,
                Duration::ZERO,
                Instant::now(),
            )
            .resting_on(principal);
        }
        let now = Instant::now();
        let subject_end = subject.map(|left| now + left);
        CachedToken::new(issued.authorization, window, lifetime, now)
            .refreshing_ahead(self.refresh_ahead, subject_end, self.expiry_margin)
            .resting_on(principal)
    }
}

/// Whether issued tokens are verified at all. `auto` does not verify On-Behalf-Of tokens:
/// Entra issues them in the format the backend's API asks for, and a v1.0 token names another
/// issuer (`https://sts.windows.net/<tenant>/`) than the v2.0 one the proxy is configured
/// with, while Microsoft Graph's are signed for Graph alone (README "Microsoft Entra ID").
pub fn verifies_issued(config: &Exchange) -> bool {
    match config.verify_issued {
        VerifyIssued::Never => false,
        VerifyIssued::Always => true,
        VerifyIssued::Auto => config.grant == Grant::TokenExchange,
    }
}

/// What an issued token must be (`exchange.verify_issued`), and the keys to check it with.
#[derive(Debug)]
struct IssuedCheck {
    mode: VerifyIssued,
    /// The exchange issuer's keys: the inbound validator's when it is the same issuer.
    keys: Arc<Validator>,
    issuer: String,
    /// Every `exchange.audience` and `exchange.resource` value: each must be in `aud`.
    audiences: Vec<String>,
}

impl IssuedCheck {
    /// The claims rules of [`Exchanger::check_issued`].
    fn judge(&self, claims: &Claims, now: SystemTime) -> Result<(), &'static str> {
        let now = now
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        match claims.exp {
            None => return Err("no exp"),
            Some(exp) if exp.0 <= now => return Err("expired"),
            Some(_) => {}
        }
        if claims.iss.as_deref() != Some(self.issuer.as_str()) {
            return Err("wrong issuer");
        }
        let aud: Vec<&str> = claims.aud.iter().flat_map(|a| a.iter()).collect();
        if !self
            .audiences
            .iter()
            .all(|want| aud.contains(&want.as_str()))
        {
            return Err("wrong audience");
        }
        Ok(())
    }
}

/// Counts one call to the token endpoint in `txp_exchange_inflight` while it lives.
struct Inflight<'a>(&'a Metrics);

impl<'a> Inflight<'a> {
    fn count(metrics: &'a Metrics) -> Self {
        metrics.exchange_inflight.fetch_add(1, Ordering::Relaxed);
        Self(metrics)
    }
}

impl Drop for Inflight<'_> {
    fn drop(&mut self) {
        self.0.exchange_inflight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The chain of an error's sources, `: `-separated (connection refused, TLS failure, ...).
/// Transport errors name the URL at most; request and response bodies never reach them.
fn causes(e: &dyn std::error::Error) -> String {
    let mut out = String::new();
    let mut next = e.source();
    while let Some(cause) = next {
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&cause.to_string());
        next = cause.source();
    }
    out
}

/// Probes the token endpoint with the proxy's credentials once it is known, until the IdP
/// accepts them: while it refuses them, `/readyz` reports [`CREDENTIALS_REJECTED`] and the
/// probe is repeated, the wait doubling from `first_wait` to [`PROBE_RETRY_MAX`]. Ends when
/// the exchanger is dropped.
async fn probe_until_accepted(exchanger: Weak<Exchanger>, first_wait: Duration) {
    let mut wait = first_wait;
    let mut refused = false;
    loop {
        let Some(this) = exchanger.upgrade() else {
            return;
        };
        if this.endpoint.get().is_some() {
            match this.probe().await {
                Ok(()) => {
                    if refused {
                        this.readiness.done(&this.ready_credentials);
                        tracing::info!(
                            "token endpoint: the proxy's client credentials are accepted now"
                        );
                    }
                    return;
                }
                Err(ProbeError::CredentialsRejected(code)) => {
                    tracing::error!(
                        code = %code,
                        retry_in_ms = wait.as_millis() as u64,
                        "token endpoint: the IdP rejects the proxy's client credentials; no token can be exchanged"
                    );
                    refused = true;
                    this.readiness.pending(this.ready_credentials.as_str());
                }
                Err(e) => tracing::warn!(
                    error = %e,
                    retry_in_ms = wait.as_millis() as u64,
                    "token endpoint: the credentials probe got no answer"
                ),
            }
            drop(this);
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(PROBE_RETRY_MAX);
        } else {
            // Discovery has not named it yet.
            drop(this);
            tokio::time::sleep(first_wait.min(Duration::from_millis(200))).await;
        }
    }
}

/// Discovers the token endpoint of the exchanger's issuer, retrying with exponential backoff;
/// stops when it is known or the exchanger is gone.
async fn discover_until_known(exchanger: Weak<Exchanger>, first_wait: Duration) {
    let mut wait = first_wait;
    loop {
        let Some(this) = exchanger.upgrade() else {
            return;
        };
        let found = idp::discover(&this.idp, &this.issuer, None)
            .await
            .and_then(|meta| {
                let grant = request::grant_type(this.grant);
                if meta
                    .grant_types_supported
                    .as_ref()
                    .is_some_and(|g| !g.iter().any(|g| g == grant))
                {
                    tracing::warn!(
                        issuer = %this.issuer,
                        grant,
                        "the issuer's metadata does not list the configured grant in grant_types_supported"
                    );
                }
                meta.token_endpoint.ok_or(IdpError::Invalid(
                    "the discovery document names no token_endpoint",
                ))
            });
        match found {
            Ok(url) => {
                tracing::info!(issuer = %this.issuer, token_endpoint = %url, "token endpoint discovered");
                let _ = this.endpoint.set(url);
                this.readiness.done(&this.ready_endpoint);
                return;
            }
            Err(e) => tracing::warn!(
                issuer = %this.issuer,
                error = %e,
                cause = %causes(&e),
                retry_in_ms = wait.as_millis() as u64,
                "token endpoint discovery failed"
            ),
        }
        drop(this);
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(DISCOVERY_RETRY_MAX);
    }
}

#[cfg(test)]
mod tests;
