//! Inbound token validation: decides, for every request, whether the client's bearer token is
//! valid (JWT against the issuer's JWKS; opaque tokens by RFC 7662 introspection).
//!
//! A JWT goes through these steps, cheapest first, and stops at the first failure:
//!
//! 1. size (`inbound.max_token_bytes`);
//! 2. the cache of decisions, keyed by the token's SHA-256 digest ([`cache`]); a remembered
//!    acceptance counts only in the key epoch it was made in ([`Validator::key_epoch`]);
//! 3. the RFC 6750 §2.1 `b64token` alphabet (a token found in the cache passed it before);
//! 4. the header, parsed by the proxy itself ([`jwt`]): three base64url segments, bounded JSON
//!    nesting, `alg` in `inbound.algorithms` (never `none` or HMAC, RFC 8725 §3.1), no `crit`
//!    (the proxy understands no extension, RFC 7515 §4.1.11), `typ` absent, `JWT` or `at+jwt`
//!    (RFC 9068 §2.1, RFC 8725 §3.11);
//! 5. **`jku`, `x5u` and `jwk` headers are refused as malformed**: a token naming its own key
//!    is either a mistake or an attack, and keys come from the issuer's JWKS only
//!    (RFC 8725 §3.10). `x5c`/`x5t` are ignored, never read;
//! 6. the key, chosen by `kid` in the JWKS ([`jwks`]); an unknown `kid` triggers one
//!    rate-limited, coalesced refetch;
//! 7. the signature, with jsonwebtoken's aws-lc backend;
//! 8. the claims ([`claims`]): `exp` (required), `nbf`, `iat` with leeway, `iss` exactly,
//!    `aud`, then the required scopes (403).
//!
//! A token that is not three dot-separated segments is introspected when
//! `inbound.introspection` is configured, and malformed otherwise.
//!
//! An acceptance ([`Principal`]) says how long it may be relied on without validating again
//! (`trusted_until`: what a remembered decision would live) and in which key epoch it was
//! made; the exchanged-token cache keeps both with each entry, which is how exchange mode
//! serves a token seen before in one lookup ([`Timing::remember_accepted`]).
//!
//! Background work ([`Validator::start`]): discovery (unless `jwks_uri` and the introspection
//! endpoint are configured), retried with backoff; the JWKS, loaded as soon as its URL is
//! known and refreshed on the schedule the IdP's `Cache-Control: max-age` asks for, within
//! bounds ([`Timing`]). `/readyz` names `discovery` and `jwks` until each is done. A failed
//! refresh keeps the last good keys. Failures are retried with doubling delays (0.5 s to
//! 30 s); the tasks end when the validator is dropped.

pub mod cache;
pub mod claims;
pub mod introspection;
pub mod jwks;
pub mod jwt;
pub mod layer;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::Algorithm;

use crate::config::Inbound;
use crate::idp::{self, IdpClient};
use crate::metrics::{Metrics, RefreshResult, RejectReason};
use crate::readiness::Readiness;
use cache::{DecisionCache, Entry, TokenDigest};
use claims::{Rules, Source, reject};
use introspection::Introspector;
use jwks::{JwkSetDocument, KeySet, KeyStore, Refetch, SelectError, VerifyKey};
use jwt::Segments;
pub use layer::{
    BearerAuth, BearerAuthLayer, Gate, NoRecall, Public, Recall, bearer_token, is_plain_path,
    is_public_path,
};

/// The readiness item for discovery.
pub const READY_DISCOVERY: &str = "discovery";
/// The readiness item for the first JWKS load.
pub const READY_JWKS: &str = "jwks";

/// First retry after a failed discovery or JWKS fetch: quick, for a pod starting beside its IdP.
pub const DEFAULT_RETRY_INITIAL: Duration = Duration::from_millis(500);
/// Retries double up to this, so an IdP that is down sees one request per 30 s per replica.
pub const DEFAULT_RETRY_MAX: Duration = Duration::from_secs(30);
/// JWKS refresh interval when the IdP sends no `max-age`.
pub const DEFAULT_JWKS_REFRESH: Duration = Duration::from_secs(300);
/// Lower bound on the refresh interval, whatever `max-age` says (`no-store` included).
pub const MIN_JWKS_REFRESH: Duration = Duration::from_secs(60);
/// Upper bound on the refresh interval, whatever `max-age` says: a key the IdP withdraws stays
/// usable here for an hour at worst.
pub const MAX_JWKS_REFRESH: Duration = Duration::from_secs(3600);
/// At most one JWKS refetch per this interval is caused by tokens with an unknown `kid`.
pub const DEFAULT_UNKNOWN_KID_INTERVAL: Duration = Duration::from_secs(10);
/// A JWKS fetch that takes longer is abandoned (and counted as a failure).
pub const DEFAULT_FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// Validated JWTs are remembered at most this long: bounds how long a token verified with a
/// key that has since been withdrawn stays accepted (a withdrawn key also clears the cache).
pub const DEFAULT_VALIDATED_TTL: Duration = Duration::from_secs(300);
/// Introspection results are remembered at most this long: bounds how long a revoked opaque
/// token stays accepted.
pub const DEFAULT_INTROSPECTION_TTL: Duration = Duration::from_secs(60);
/// Decisions remembered; about 200 bytes each, so about 20 MiB when full.
pub const DEFAULT_CACHE_ENTRIES: u64 = 100_000;

/// What the proxy knows about a validated client token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The token's `sub`, for the access log (shared: every request of the token logs it).
    pub sub: Option<Arc<str>>,
    /// The token's `exp` (seconds since the Unix epoch), bounding how long an exchanged token
    /// may be cached.
    pub expires_at: Option<u64>,
    /// Until when this acceptance may be relied on without validating the token again (tokio
    /// clock): what a cached decision would live, i.e. `exp` + leeway capped by
    /// [`Timing::validated_ttl`] (JWT) or [`Timing::introspection_ttl`] (introspection).
    /// `None`: not beyond the current request.
    pub trusted_until: Option<tokio::time::Instant>,
    /// [`Validator::key_epoch`] when the token was validated: an acceptance from an older
    /// epoch may rest on a key that has since been withdrawn.
    pub key_epoch: u64,
    /// The profile that accepted it (its index in the config; 0 without named profiles).
    pub profile: usize,
}

impl Principal {
    /// Whether the acceptance still holds at `now` in key epoch `epoch`.
    pub fn trusted(&self, now: tokio::time::Instant, epoch: u64) -> bool {
        acceptance_holds(self.trusted_until, self.key_epoch, now, epoch)
    }
}

/// Whether an acceptance trusted until `until` (`None`: not beyond its request), made in key
/// epoch `made_in`, still holds at `now` in key epoch `epoch`.
pub fn acceptance_holds(
    until: Option<tokio::time::Instant>,
    made_in: u64,
    now: tokio::time::Instant,
    epoch: u64,
) -> bool {
    made_in == epoch && until.is_some_and(|t| now < t)
}

/// Why a token issued by another party could not be verified ([`Validator::verify_signed`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unverified {
    /// Not a compact JWS: an opaque token, which only its issuer can read.
    NotJwt,
    /// The issuer's keys are not loaded (yet).
    NoKeys,
    /// A JWS that fails: malformed, an algorithm not allowed, an unknown key, a bad signature.
    Invalid(&'static str),
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

/// Intervals and bounds of the validator. [`Timing::default`] is what the proxy runs with;
/// tests shorten the intervals so nothing sleeps for long.
#[derive(Debug, Clone)]
pub struct Timing {
    /// First retry delay after a failed discovery or JWKS fetch; doubles on each failure.
    pub retry_initial: Duration,
    /// Cap for the retry delay.
    pub retry_max: Duration,
    /// JWKS refresh interval without `Cache-Control: max-age`.
    pub jwks_refresh: Duration,
    /// Lower bound for an IdP-provided `max-age`.
    pub jwks_refresh_min: Duration,
    /// Upper bound for an IdP-provided `max-age`.
    pub jwks_refresh_max: Duration,
    /// Minimum time between two refetches caused by unknown `kid`s.
    pub unknown_kid_interval: Duration,
    /// Bound on one JWKS fetch.
    pub fetch_timeout: Duration,
    /// Bound on one introspection call.
    pub introspection_timeout: Duration,
    /// Longest life of a cached JWT decision.
    pub validated_ttl: Duration,
    /// Longest life of a cached introspection result.
    pub introspection_ttl: Duration,
    /// Decisions remembered at most.
    pub cache_entries: u64,
    /// Whether accepted JWTs are remembered in the decision cache. Off in exchange mode: there
    /// the exchanged-token cache entry carries the acceptance ([`Principal::trusted_until`],
    /// [`Principal::key_epoch`]), so a token seen again costs one lookup and one entry.
    pub remember_accepted: bool,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            retry_initial: DEFAULT_RETRY_INITIAL,
            retry_max: DEFAULT_RETRY_MAX,
            jwks_refresh: DEFAULT_JWKS_REFRESH,
            jwks_refresh_min: MIN_JWKS_REFRESH,
            jwks_refresh_max: MAX_JWKS_REFRESH,
            unknown_kid_interval: DEFAULT_UNKNOWN_KID_INTERVAL,
            fetch_timeout: DEFAULT_FETCH_TIMEOUT,
            introspection_timeout: introspection::INTROSPECTION_TIMEOUT,
            validated_ttl: DEFAULT_VALIDATED_TTL,
            introspection_ttl: DEFAULT_INTROSPECTION_TTL,
            cache_entries: DEFAULT_CACHE_ENTRIES,
            remember_accepted: true,
        }
    }
}

impl Timing {
    /// The JWKS refresh interval for a response that carried `max_age`.
    pub fn refresh_interval(&self, max_age: Option<Duration>) -> Duration {
        max_age.unwrap_or(self.jwks_refresh).clamp(
            self.jwks_refresh_min,
            self.jwks_refresh_min.max(self.jwks_refresh_max),
        )
    }
}

/// Validates client tokens.
pub struct Validator {
    issuer: String,
    discovery_url: Option<url::Url>,
    algorithms: Vec<Algorithm>,
    max_token_bytes: usize,
    rules: Rules,
    idp: IdpClient,
    metrics: Arc<Metrics>,
    readiness: Arc<Readiness>,
    timing: Timing,
    keys: KeyStore,
    cache: DecisionCache,
    /// Bumped whenever a key leaves the JWKS (and cached decisions are forgotten).
    key_epoch: AtomicU64,
    introspection: Option<Introspector>,
    /// Set to `true` once discovery has filled in what was not configured.
    discovered: tokio::sync::watch::Sender<bool>,
    /// The `/readyz` items this validator waits for (`discovery`, `jwks`, prefixed with a
    /// profile's name when there are several).
    ready_discovery: String,
    ready_jwks: String,
    /// Told of tokens that introspection reports inactive.
    revoked: std::sync::OnceLock<RevocationHook>,
    /// The profile this validator is (its index in the config), stamped on its acceptances.
    profile: usize,
}

/// What [`Validator::on_revoked`] calls with a revoked token.
pub type RevocationHook =
    Arc<dyn Fn(&str) -> futures_util::future::BoxFuture<'static, ()> + Send + Sync>;

impl std::fmt::Debug for Validator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Validator")
            .field("issuer", &self.issuer)
            .field("jwks_uri", &self.keys.uri().map(url::Url::as_str))
            .field("algorithms", &self.algorithms)
            .field("introspection", &self.introspection.is_some())
            .field("cache", &self.cache)
            .finish_non_exhaustive()
    }
}

impl Validator {
    /// Builds the validator; registers what `/readyz` waits for.
    pub fn new(
        config: &Inbound,
        idp: IdpClient,
        metrics: Arc<Metrics>,
        readiness: Arc<Readiness>,
    ) -> Self {
        Self::with_timing(config, idp, metrics, readiness, Timing::default())
    }

    /// [`Validator::new`] with other intervals and bounds.
    pub fn with_timing(
        config: &Inbound,
        idp: IdpClient,
        metrics: Arc<Metrics>,
        readiness: Arc<Readiness>,
        timing: Timing,
    ) -> Self {
        Self::named(config, idp, metrics, readiness, timing, "")
    }

    /// [`Validator::with_timing`], its `/readyz` items named with `prefix` (`corp/`: the
    /// items are `corp/discovery`, `corp/jwks`).
    pub fn named(
        config: &Inbound,
        idp: IdpClient,
        metrics: Arc<Metrics>,
        readiness: Arc<Readiness>,
        timing: Timing,
        prefix: &str,
    ) -> Self {
        let rules = Rules::new(config);
        let introspection = config
            .introspection
            .as_ref()
            .map(|c| Introspector::new(c, timing.introspection_timeout));
        let validator = Self {
            issuer: config.issuer.clone(),
            discovery_url: config.discovery_url.clone(),
            // HMAC can never be allowed, whatever the configuration says (RFC 8725 §2.1).
            algorithms: config
                .algorithms
                .iter()
                .copied()
                .filter(|a| jwt::is_asymmetric(*a))
                .collect(),
            max_token_bytes: config.max_token_bytes,
            cache: DecisionCache::new(timing.cache_entries, rules.leeway()),
            key_epoch: AtomicU64::new(0),
            rules,
            keys: KeyStore::new(config.jwks_uri.clone(), timing.unknown_kid_interval),
            idp,
            metrics,
            readiness,
            timing,
            introspection,
            discovered: tokio::sync::watch::Sender::new(false),
            ready_discovery: format!("{prefix}{READY_DISCOVERY}"),
            ready_jwks: format!("{prefix}{READY_JWKS}"),
            revoked: std::sync::OnceLock::new(),
            profile: 0,
        };
        if validator.needs_discovery() {
            validator
                .readiness
                .pending(validator.ready_discovery.as_str());
        }
        validator.readiness.pending(validator.ready_jwks.as_str());
        validator
    }

    fn needs_discovery(&self) -> bool {
        self.keys.uri().is_none()
            || self
                .introspection
                .as_ref()
                .is_some_and(Introspector::needs_endpoint)
    }

    /// The validator of profile `index` (its position in the config): its acceptances say so.
    pub fn for_profile(mut self, index: usize) -> Self {
        self.profile = index;
        self
    }

    /// The profile this validator is.
    pub fn profile(&self) -> usize {
        self.profile
    }

    /// The issuer whose tokens this validator accepts.
    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// Whether opaque tokens are introspected here.
    pub fn introspects(&self) -> bool {
        self.introspection.is_some()
    }

    /// Starts background work (discovery, JWKS loading and refresh). The tasks end when the
    /// validator is dropped.
    pub fn start(self: &Arc<Self>) {
        if self.needs_discovery() {
            tokio::spawn(Self::discovery_task(Arc::downgrade(self)));
        }
        tokio::spawn(Self::jwks_task(Arc::downgrade(self)));
    }

    /// The current key epoch: changes whenever a key is withdrawn from the issuer's JWKS, so
    /// that acceptances remembered elsewhere ([`Principal::key_epoch`]) can be recognised as
    /// possibly resting on a withdrawn key.
    pub fn key_epoch(&self) -> u64 {
        self.key_epoch.load(Ordering::Acquire)
    }

    /// A key was withdrawn: a new epoch, and every cached decision forgotten.
    fn forget_decisions(&self) {
        self.key_epoch.fetch_add(1, Ordering::AcqRel);
        self.cache.clear();
    }

    /// Remembers `principal`, this validator's acceptance of `token`, in the decision cache
    /// for as long as it is trusted, when [`Timing::remember_accepted`] left it out: exchange
    /// mode calls this when the token's exchange failed, so that retries while the IdP is
    /// down or refusing cost a lookup rather than a signature check. An acceptance from an
    /// older key epoch is not kept.
    pub async fn remember(&self, token: &str, principal: &Principal) {
        let Some(until) = principal.trusted_until else {
            return;
        };
        let ttl = until.saturating_duration_since(tokio::time::Instant::now());
        if ttl.is_zero() || principal.key_epoch != self.key_epoch() {
            return;
        }
        self.cache
            .insert(cache::digest(token), Ok(principal.clone()), ttl)
            .await;
    }

    /// Forgets the decisions about client tokens whose `sub` is `sub` (`None`: every
    /// decision); returns how many were removed.
    pub async fn purge(&self, sub: Option<&str>) -> u64 {
        self.cache.purge(sub).await
    }

    /// Calls `hook` with every token that introspection reports inactive, before it is
    /// refused: what else the proxy remembers about it (its exchanged token) can go at once.
    pub fn on_revoked(&self, hook: RevocationHook) {
        let _ = self.revoked.set(hook);
    }

    /// Number of cached decisions (for a gauge).
    pub fn cached_decisions(&self) -> u64 {
        self.cache.len()
    }

    /// Validates `token` (the bytes after `Bearer `).
    pub async fn validate(&self, token: &str) -> Result<Principal, InboundError> {
        self.validate_digested(token, cache::digest(token)).await
    }

    /// Validates `token`, whose SHA-256 digest ([`cache::digest`]) the caller has already
    /// computed for lookups of its own.
    pub async fn validate_digested(
        &self,
        token: &str,
        digest: TokenDigest,
    ) -> Result<Principal, InboundError> {
        if token.len() > self.max_token_bytes {
            return Err(reject(RejectReason::TooLarge, "token too large"));
        }
        // Read before any key is looked up: an acceptance is stamped with the epoch it began
        // in, so a withdrawal that happens while it is being verified makes it stale.
        let epoch = self.key_epoch();
        let now = unix_now();
        match self.cache.get(&digest, now).await {
            // A decision inserted after a withdrawal by a validation that began before it.
            Some(Ok(p)) if p.key_epoch != epoch => {}
            Some(decision) => return decision,
            None => {}
        }
        // Only decisions about well-formed tokens are ever cached, so the alphabet needs
        // checking on a miss only.
        if !jwt::is_b64token(token) {
            return Err(reject(RejectReason::Malformed, "malformed token"));
        }
        // Boxed: a full validation's future is large (a key fetch, an introspection call),
        // and a request answered from the decision cache above, or from an exchange's recall
        // before this, should not carry (and copy) its room on every call.
        match (jwt::split(token), &self.introspection) {
            (Some(segments), _) => Box::pin(self.validate_jwt(segments, digest, now, epoch)).await,
            (None, Some(introspector)) => {
                Box::pin(self.validate_opaque(introspector, token, digest, now, epoch)).await
            }
            (None, None) => Err(reject(RejectReason::Malformed, "token is not a JWT")),
        }
    }

    /// Checks the signature of `token`, a JWT issued by this validator's issuer to someone
    /// else (e.g. the token an exchange issued for the backend), with the same header rules
    /// and keys as a client token, and returns its claims unjudged: what they must say is the
    /// caller's to decide.
    pub async fn verify_signed(&self, token: &str) -> Result<claims::Claims, Unverified> {
        let invalid = |e: jwt::Malformed| Unverified::Invalid(e.0);
        let segments = jwt::split(token).ok_or(Unverified::NotJwt)?;
        let header = jwt::parse_header(segments.header).map_err(invalid)?;
        let alg = header
            .algorithm()
            .filter(|a| self.algorithms.contains(a))
            .ok_or(Unverified::Invalid("algorithm not allowed"))?;
        header.check().map_err(invalid)?;
        let claims = jwt::parse_claims(segments.payload).map_err(invalid)?;
        jwt::decode_segment(segments.signature).map_err(invalid)?;
        let key = match self.key_for(header.kid.as_deref(), alg).await {
            Ok(key) => key,
            Err(InboundError::Unavailable) => return Err(Unverified::NoKeys),
            Err(InboundError::Rejected { description, .. }) => {
                return Err(Unverified::Invalid(description));
            }
            Err(InboundError::InsufficientScope { .. }) => {
                return Err(Unverified::Invalid("no key"));
            }
        };
        if !key.verify(&segments, alg) {
            return Err(Unverified::Invalid("invalid signature"));
        }
        Ok(claims)
    }

    async fn validate_jwt(
        &self,
        segments: Segments<'_>,
        digest: TokenDigest,
        now: i64,
        epoch: u64,
    ) -> Result<Principal, InboundError> {
        let malformed = |e: jwt::Malformed| reject(RejectReason::Malformed, e.0);
        let header = jwt::parse_header(segments.header).map_err(malformed)?;
        let alg = header
            .algorithm()
            .filter(|a| self.algorithms.contains(a))
            .ok_or(reject(RejectReason::Algorithm, "algorithm not allowed"))?;
        header.check().map_err(malformed)?;
        let claims = jwt::parse_claims(segments.payload).map_err(malformed)?;
        jwt::decode_segment(segments.signature).map_err(malformed)?;
        let key = self.key_for(header.kid.as_deref(), alg).await?;
        if !key.verify(&segments, alg) {
            return Err(reject(RejectReason::Signature, "invalid signature"));
        }
        let exp = claims.exp.map(|d| d.0);
        let ttl = claims::ttl(exp, self.rules.leeway(), now, self.timing.validated_ttl);
        let decision = self
            .rules
            .check(&claims, now, Source::Jwt)
            .map(|p| stamp(p, ttl, epoch, self.profile));
        let remember = match &decision {
            Ok(_) => self.timing.remember_accepted,
            Err(_) => claims::cacheable(&decision),
        };
        if remember && let Some(ttl) = ttl {
            self.cache.insert(digest, decision.clone(), ttl).await;
        }
        decision
    }

    /// The key for `kid`/`alg`, refetching the JWKS once (rate-limited) for an unknown `kid`.
    async fn key_for(
        &self,
        kid: Option<&str>,
        alg: Algorithm,
    ) -> Result<Arc<VerifyKey>, InboundError> {
        let (set, generation) = self.keys.snapshot().ok_or(InboundError::Unavailable)?;
        match set.select(kid, alg) {
            Err(SelectError::UnknownKid) => {}
            other => return other.map_err(select_error),
        }
        drop(set);
        let outcome = self
            .keys
            .refetch_for_unknown_kid(generation, || self.fetch_jwks())
            .await;
        tracing::debug!(?outcome, "JWKS refetch for an unknown kid");
        if let Refetch::Fetched { lost_keys: true } = outcome {
            self.forget_decisions();
        }
        let (set, _) = self.keys.snapshot().ok_or(InboundError::Unavailable)?;
        set.select(kid, alg).map_err(select_error)
    }

    async fn validate_opaque(
        &self,
        introspector: &Introspector,
        token: &str,
        digest: TokenDigest,
        now: i64,
        epoch: u64,
    ) -> Result<Principal, InboundError> {
        let init = async {
            let answer = introspector
                .introspect(&self.idp, token)
                .await
                .map_err(|e| {
                    tracing::warn!(error = %e, "token introspection failed");
                    InboundError::Unavailable
                })?;
            let decision = if answer.active {
                self.rules.check(&answer.claims, now, Source::Introspection)
            } else {
                if let Some(hook) = self.revoked.get() {
                    hook(token).await;
                }
                Err(reject(RejectReason::Inactive, "token is not active"))
            };
            if !claims::cacheable(&decision) {
                return Err(decision.err().unwrap_or(InboundError::Unavailable));
            }
            let exp = answer.claims.exp.map(|d| d.0);
            let ttl = claims::ttl(exp, self.rules.leeway(), now, self.timing.introspection_ttl)
                .ok_or(reject(RejectReason::Expired, "token expired"))?;
            let decision = decision.map(|p| stamp(p, Some(ttl), epoch, self.profile));
            Ok(Entry { decision, ttl })
        };
        self.cache.get_or_try_insert_with(digest, now, init).await
    }

    /// Installs the key set `fetch` yields (under the fetch lock); forgets cached decisions
    /// when a key was withdrawn; marks the JWKS ready. Returns the response's `max-age`.
    async fn refresh_keys<Fut>(&self, fetch: Fut) -> Option<Option<Duration>>
    where
        Fut: std::future::Future<Output = Option<(KeySet, Option<Duration>)>>,
    {
        let (lost_keys, max_age) = self.keys.refresh(fetch).await?;
        if lost_keys {
            self.forget_decisions();
        }
        self.readiness.done(&self.ready_jwks);
        Some(max_age)
    }

    /// Fetches and parses the JWKS; counts the outcome. `None` on any failure (logged).
    async fn fetch_jwks(&self) -> Option<(KeySet, Option<Duration>)> {
        let uri = self.keys.uri()?;
        let fetched = tokio::time::timeout(
            self.timing.fetch_timeout,
            self.idp.get_json::<JwkSetDocument>(uri),
        )
        .await;
        let result = match fetched {
            Ok(Ok((doc, headers))) => {
                let (set, skipped) = KeySet::from_document(&doc);
                if !skipped.is_empty() {
                    tracing::debug!(?skipped, "JWKS keys not used");
                }
                if set.is_empty() {
                    // A valid document that names no usable key: the IdP's word, so it is
                    // installed (and every JWT refused), but it deserves attention.
                    tracing::warn!(jwks_uri = %uri, "the JWKS has no usable signing key");
                }
                Ok((set, jwks::max_age(&headers)))
            }
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("the JWKS fetch timed out".to_owned()),
        };
        match result {
            Ok((set, max_age)) => {
                self.metrics.jwks_refreshes.inc(RefreshResult::Success);
                tracing::debug!(keys = set.len(), jwks_uri = %uri, "JWKS loaded");
                Some((set, max_age))
            }
            Err(error) => {
                self.metrics.jwks_refreshes.inc(RefreshResult::Failure);
                tracing::warn!(%error, jwks_uri = %uri, "JWKS fetch failed; keeping the last good keys");
                None
            }
        }
    }

    /// Reads the discovery document for what is not configured.
    async fn discover(&self) -> Result<(), idp::IdpError> {
        if !self.needs_discovery() {
            return Ok(());
        }
        let meta = idp::discover(&self.idp, &self.issuer, self.discovery_url.as_ref()).await?;
        if self.keys.uri().is_none() {
            let uri = meta.jwks_uri.ok_or(idp::IdpError::Invalid(
                "the discovery document has no jwks_uri",
            ))?;
            self.keys.set_uri(uri);
        }
        if let Some(introspector) = &self.introspection {
            match meta.introspection_endpoint {
                Some(url) => introspector.set_endpoint(url),
                None if introspector.needs_endpoint() => tracing::error!(
                    "inbound.introspection is configured without an endpoint and discovery names none; opaque tokens will be answered 503"
                ),
                None => {}
            }
        }
        self.readiness.done(&self.ready_discovery);
        Ok(())
    }

    /// Discovery, retried with backoff until it succeeds; wakes the JWKS task when done.
    async fn discovery_task(this: Weak<Self>) {
        let Some(timing) = this.upgrade().map(|v| v.timing.clone()) else {
            return;
        };
        let mut backoff = Backoff::new(timing.retry_initial, timing.retry_max);
        loop {
            let Some(v) = this.upgrade() else { return };
            match v.discover().await {
                Ok(()) => {
                    v.discovered.send_replace(true);
                    return;
                }
                Err(error) => {
                    tracing::warn!(%error, issuer = %v.issuer, "discovery failed; retrying");
                }
            }
            drop(v);
            tokio::time::sleep(backoff.next_delay()).await;
        }
    }

    /// JWKS loads and refreshes, once the JWKS URL is known (configured, or from discovery:
    /// a configured `jwks_uri` never waits for discovery of the introspection endpoint).
    async fn jwks_task(this: Weak<Self>) {
        let Some((timing, mut discovered)) = this
            .upgrade()
            .map(|v| (v.timing.clone(), v.discovered.subscribe()))
        else {
            return;
        };
        while this.upgrade().is_some_and(|v| v.keys.uri().is_none()) {
            // Holds no reference to the validator while waiting; ends if it is dropped.
            if discovered.changed().await.is_err() {
                return;
            }
        }
        let mut backoff = Backoff::new(timing.retry_initial, timing.retry_max);
        loop {
            let Some(v) = this.upgrade() else { return };
            let delay = match v.refresh_keys(v.fetch_jwks()).await {
                Some(max_age) => {
                    backoff.reset();
                    timing.refresh_interval(max_age)
                }
                None => backoff.next_delay(),
            };
            drop(v);
            tokio::time::sleep(delay).await;
        }
    }
}

fn select_error(e: SelectError) -> InboundError {
    match e {
        SelectError::UnknownKid => reject(RejectReason::UnknownKey, "unknown signing key"),
        SelectError::NoKid => reject(RejectReason::UnknownKey, "token has no key id"),
        SelectError::Mismatch => {
            reject(RejectReason::Algorithm, "algorithm does not match the key")
        }
    }
}

/// Seconds since the Unix epoch.
/// Marks an acceptance as trusted for `ttl` from now (tokio clock) in key epoch `epoch`.
fn stamp(principal: Principal, ttl: Option<Duration>, epoch: u64, profile: usize) -> Principal {
    Principal {
        trusted_until: ttl.map(|t| tokio::time::Instant::now() + t),
        key_epoch: epoch,
        profile,
        ..principal
    }
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// Doubling retry delays between `initial` and `max`.
#[derive(Debug)]
struct Backoff {
    initial: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max,
            next: initial,
        }
    }

    fn next_delay(&mut self) -> Duration {
        let d = self.next.min(self.max);
        self.next = (self.next * 2).min(self.max);
        d
    }

    fn reset(&mut self) {
        self.next = self.initial;
    }
}

#[cfg(test)]
mod tests;

/// The bounds on the JWKS refresh interval, apart from [`tests`] (the validator's).
#[cfg(test)]
mod refresh_bounds {
    use super::*;

    #[test]
    fn a_max_age_beyond_an_hour_is_clamped_to_an_hour() {
        let t = Timing::default();
        let hour = Duration::from_secs(3600);
        assert_eq!(t.refresh_interval(Some(Duration::from_secs(86_400))), hour);
        assert_eq!(
            t.refresh_interval(Some(Duration::from_secs(365 * 86_400))),
            hour
        );
        assert_eq!(t.refresh_interval(Some(hour)), hour);
        assert_eq!(
            t.refresh_interval(Some(Duration::from_secs(1800))),
            Duration::from_secs(1800)
        );
        assert_eq!(
            t.refresh_interval(Some(Duration::ZERO)),
            Duration::from_secs(60)
        );
        assert_eq!(t.refresh_interval(None), Duration::from_secs(300));
    }
}
