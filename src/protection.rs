//! [`Protection`]: the validators, the exchangers and what they share, built from the config
//! and started; the source of the two layers, for the proxy binary and for a server that
//! embeds them (README "Use as a library").
//!
//! With several `profiles` (README "Several issuers") each has its own validator (discovery,
//! JWKS, rules), exchanger (token endpoint, cache keys, circuit breaker) and `/readyz` items,
//! named with the profile (`corp/jwks`).

use std::sync::Arc;

use crate::config::{Config, Mode, Profile, VerifyIssued};
use crate::error::Responder;
use crate::exchange::{Exchanger, ExchangerOptions, TokenExchangeLayer};
use crate::idp::{IdpClient, IdpError};
use crate::inbound::{self, BearerAuthLayer, Gate, Validator};
use crate::metadata::Resource;
use crate::metrics::Metrics;
use crate::readiness::Readiness;
use crate::telemetry::Telemetry;

/// What goes on in place of the client's token.
#[derive(Debug, Clone)]
pub enum Forwarding {
    /// The token exchanged at the IdP (RFC 8693, or Entra's On-Behalf-Of): the client's never
    /// goes further.
    Exchange(Arc<Exchanger>),
    /// The validated client token itself.
    Passthrough,
}

/// Why the protection could not be built.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// The IdP client (its trust anchors) could not be built.
    #[error(transparent)]
    Idp(#[from] IdpError),
    /// A credential file of `exchange.client_auth` is unusable.
    #[error(transparent)]
    Exchange(#[from] crate::exchange::SetupError),
    /// Exchange mode without an `exchange` section: a configuration that validation refuses,
    /// built by hand.
    #[error("exchange mode needs the exchange settings")]
    ExchangeUnconfigured,
    /// The OTLP exporter cannot be built (README "Traces").
    #[error(transparent)]
    Telemetry(#[from] crate::telemetry::TelemetryError),
}

/// One profile, started.
#[derive(Debug, Clone)]
pub struct Guard {
    /// The profile's name (empty without named profiles).
    pub name: String,
    pub validator: Arc<Validator>,
    pub forwarding: Forwarding,
    /// `inbound.stream_lifetime` is `token`.
    pub stream_bound: bool,
    /// `inbound.leeway`.
    pub leeway: std::time::Duration,
}

impl Guard {
    /// The exchanger, in exchange mode.
    pub fn exchanger(&self) -> Option<&Arc<Exchanger>> {
        match &self.forwarding {
            Forwarding::Exchange(e) => Some(e),
            Forwarding::Passthrough => None,
        }
    }
}

/// Longest issued token the proxy verifies: as for client tokens, far beyond any real one.
const MAX_ISSUED_TOKEN_BYTES: usize = 16 * 1024;

/// See the module documentation.
#[derive(Debug, Clone)]
pub struct Protection {
    pub metrics: Arc<Metrics>,
    pub readiness: Arc<Readiness>,
    /// Every profile, in config order (one without named profiles).
    pub guards: Arc<[Guard]>,
    /// Named in challenges and served as RFC 9728 metadata.
    pub resource: Arc<Resource>,
    /// The tracer, when `telemetry.otlp_endpoint` is set (README "Traces").
    pub telemetry: Option<Arc<Telemetry>>,
    responder: Responder,
    /// Prefixes forwarded without a token: every profile's `inbound.public_paths`.
    public_paths: Vec<String>,
    /// The largest `inbound.max_token_bytes` of any profile.
    max_token_bytes: usize,
}

impl Protection {
    /// Builds every profile's validator and, in exchange mode, its exchanger, and starts their
    /// background work (discovery, keys, token endpoint). Needs a tokio runtime.
    pub fn start(config: &Config) -> Result<Self, SetupError> {
        let names: Vec<String> = config.profiles.iter().map(|p| p.name.clone()).collect();
        let metrics = Arc::new(Metrics::with_profiles(&names));
        let readiness = Arc::new(Readiness::default());
        let idp = IdpClient::new(&config.idp_tls)?;
        let mut guards = Vec::with_capacity(config.profiles.len());
        for (index, profile) in config.profiles.iter().enumerate() {
            guards.push(start_profile(
                config, profile, index, &idp, &metrics, &readiness,
            )?);
        }
        let resource = Arc::new(Resource::from_config(config));
        let telemetry = Telemetry::start(&config.telemetry, &names, metrics.clone())?;
        let mut public_paths: Vec<String> = config
            .profiles
            .iter()
            .flat_map(|p| p.inbound.public_paths.iter().cloned())
            .collect();
        public_paths.sort();
        public_paths.dedup();
        Ok(Self {
            responder: Responder::new(resource.clone(), metrics.clone()),
            max_token_bytes: config
                .profiles
                .iter()
                .map(|p| p.inbound.max_token_bytes)
                .max()
                .unwrap_or(crate::config::DEFAULT_MAX_TOKEN_BYTES),
            public_paths,
            metrics,
            readiness,
            guards: guards.into(),
            resource,
            telemetry,
        })
    }

    /// The validation layer: a token picks its profile by its `iss`, and is validated by that
    /// profile's rules and keys only. In exchange mode a token seen before is accepted by the
    /// acceptance its exchanged-token cache entry carries.
    pub fn bearer_auth(&self) -> BearerAuthLayer<Option<Arc<Exchanger>>> {
        let gates = self
            .guards
            .iter()
            .map(|g| Gate {
                validator: g.validator.clone(),
                recall: g.exchanger().cloned(),
            })
            .collect();
        BearerAuthLayer::with_gates(
            gates,
            self.public_paths.clone(),
            self.max_token_bytes,
            self.responder.clone(),
        )
    }

    /// The exchange layer; `None` in passthrough mode.
    pub fn token_exchange(&self) -> Option<TokenExchangeLayer> {
        let exchangers: Option<Vec<Arc<Exchanger>>> =
            self.guards.iter().map(|g| g.exchanger().cloned()).collect();
        let validators = self.guards.iter().map(|g| g.validator.clone()).collect();
        exchangers.map(|exchangers| {
            TokenExchangeLayer::with_profiles(
                exchangers,
                validators,
                self.responder.clone(),
                self.max_token_bytes,
            )
        })
    }

    /// Forgets every cached exchange and validation decision of client tokens whose `sub` is
    /// `sub` (`None`: everything), in every profile; returns how many entries went from the
    /// caches, and counts them in `txp_cache_purged_total` (README "Admin endpoints").
    pub async fn purge(&self, sub: Option<&str>) -> u64 {
        let mut purged = 0;
        for guard in self.guards.iter() {
            purged += guard.validator.purge(sub).await;
            if let Some(exchanger) = guard.exchanger() {
                purged += exchanger.purge(sub).await;
            }
        }
        self.metrics
            .cache_purged
            .fetch_add(purged, std::sync::atomic::Ordering::Relaxed);
        purged
    }

    /// The first profile's validator (the only one without named profiles).
    pub fn validator(&self) -> &Arc<Validator> {
        &self.guards[0].validator
    }

    /// The first profile's exchanger, in exchange mode.
    pub fn exchanger(&self) -> Option<&Arc<Exchanger>> {
        self.guards[0].exchanger()
    }

    /// Every exchanger, in exchange mode.
    pub fn exchangers(&self) -> impl Iterator<Item = &Arc<Exchanger>> {
        self.guards.iter().filter_map(Guard::exchanger)
    }

    /// The responder the layers refuse requests with.
    pub fn responder(&self) -> &Responder {
        &self.responder
    }
}

/// Builds and starts profile `index`.
fn start_profile(
    config: &Config,
    profile: &Profile,
    index: usize,
    idp: &IdpClient,
    metrics: &Arc<Metrics>,
    readiness: &Arc<Readiness>,
) -> Result<Guard, SetupError> {
    let prefix = if profile.name.is_empty() {
        String::new()
    } else {
        format!("{}/", profile.name)
    };
    let timing = inbound::Timing {
        // In exchange mode the exchanged-token cache entry carries the acceptance.
        remember_accepted: config.mode != Mode::Exchange,
        ..inbound::Timing::default()
    };
    let validator = Arc::new(
        Validator::named(
            &profile.inbound,
            idp.clone(),
            metrics.clone(),
            readiness.clone(),
            timing,
            &prefix,
        )
        .for_profile(index),
    );
    let forwarding = match config.mode {
        Mode::Passthrough => Forwarding::Passthrough,
        Mode::Exchange => {
            let exchange = profile
                .exchange
                .as_ref()
                .ok_or(SetupError::ExchangeUnconfigured)?;
            let issued_keys = issued_keys(profile, exchange, &validator, idp, metrics, readiness);
            let exchanger = Arc::new(
                Exchanger::for_profile(
                    exchange,
                    &config.cache,
                    idp.clone(),
                    metrics.clone(),
                    readiness.clone(),
                    ExchangerOptions::default(),
                    index,
                    &profile.name,
                )?
                .verifying_issued_with(exchange, issued_keys),
            );
            exchanger.start();
            // A token that introspection finds revoked takes its exchange with it.
            let weak = Arc::downgrade(&exchanger);
            validator.on_revoked(Arc::new(move |token: &str| {
                let (weak, token) = (weak.clone(), secrecy::SecretString::from(token));
                Box::pin(async move {
                    use secrecy::ExposeSecret as _;
                    if let Some(exchanger) = weak.upgrade() {
                        exchanger.forget(token.expose_secret()).await;
                    }
                })
            }));
            Forwarding::Exchange(exchanger)
        }
    };
    validator.start();
    Ok(Guard {
        name: profile.name.clone(),
        validator,
        forwarding,
        stream_bound: profile.inbound.stream_lifetime == crate::config::StreamLifetime::Token,
        leeway: profile.inbound.leeway,
    })
}

/// The keys that verify a profile's issued tokens: its inbound validator's when the exchange
/// issuer is the inbound one, else a validator of the exchange issuer's own (its discovery
/// and JWKS, named `exchange/…` in `/readyz`, and waited for only with
/// `verify_issued: always`).
fn issued_keys(
    profile: &Profile,
    exchange: &crate::config::Exchange,
    validator: &Arc<Validator>,
    idp: &IdpClient,
    metrics: &Arc<Metrics>,
    readiness: &Arc<Readiness>,
) -> Arc<Validator> {
    if exchange.issuer == profile.inbound.issuer {
        return validator.clone();
    }
    let own = crate::config::Inbound {
        issuer: exchange.issuer.clone(),
        discovery_url: None,
        jwks_uri: None,
        audiences: exchange.audience.clone(),
        algorithms: profile.inbound.algorithms.clone(),
        leeway: std::time::Duration::ZERO,
        required_scopes: Vec::new(),
        max_token_bytes: MAX_ISSUED_TOKEN_BYTES,
        introspection: None,
        public_paths: Vec::new(),
        stream_lifetime: crate::config::StreamLifetime::Unlimited,
    };
    // Only `always` makes the proxy unready until these keys are loaded.
    let waits_for = match exchange.verify_issued {
        VerifyIssued::Always => readiness.clone(),
        VerifyIssued::Auto | VerifyIssued::Never => Arc::new(Readiness::default()),
    };
    let prefix = if profile.name.is_empty() {
        "exchange/".to_owned()
    } else {
        format!("{}/exchange/", profile.name)
    };
    let keys = Arc::new(Validator::named(
        &own,
        idp.clone(),
        metrics.clone(),
        waits_for,
        inbound::Timing::default(),
        &prefix,
    ));
    if crate::exchange::verifies_issued(exchange) {
        keys.start();
    }
    keys
}
