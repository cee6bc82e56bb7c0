//! [`Protection`]: the validator, the exchanger and what they share, built from the config
//! and started; the source of the two layers, for the proxy binary and for a server that
//! embeds them (README "Use as a library").

use std::sync::Arc;

use crate::config::{Config, Mode, VerifyIssued};
use crate::error::Responder;
use crate::exchange::{Exchanger, TokenExchangeLayer};
use crate::idp::{IdpClient, IdpError};
use crate::inbound::{self, BearerAuthLayer, Validator};
use crate::metadata::Resource;
use crate::metrics::Metrics;
use crate::readiness::Readiness;

/// What goes on in place of the client's token.
#[derive(Debug, Clone)]
pub enum Forwarding {
    /// The token exchanged at the IdP (RFC 8693): the client's never goes further.
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
}

/// Longest issued token the proxy verifies: as for client tokens, far beyond any real one.
const MAX_ISSUED_TOKEN_BYTES: usize = 16 * 1024;

/// The keys that verify issued tokens: the inbound validator's when the exchange issuer is the
/// inbound one, else a validator of the exchange issuer's own (its discovery and JWKS, named
/// `exchange/…` in `/readyz`, and waited for only with `verify_issued: always`).
fn issued_keys(
    config: &Config,
    exchange: &crate::config::Exchange,
    validator: &Arc<Validator>,
    idp: &IdpClient,
    metrics: &Arc<Metrics>,
    readiness: &Arc<Readiness>,
) -> Arc<Validator> {
    if exchange.issuer == config.inbound.issuer {
        return validator.clone();
    }
    let own = crate::config::Inbound {
        issuer: exchange.issuer.clone(),
        discovery_url: None,
        jwks_uri: None,
        audiences: exchange.audience.clone(),
        algorithms: config.inbound.algorithms.clone(),
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
    let keys = Arc::new(Validator::named(
        &own,
        idp.clone(),
        metrics.clone(),
        waits_for,
        inbound::Timing::default(),
        "exchange/",
    ));
    if exchange.verify_issued != VerifyIssued::Never {
        keys.start();
    }
    keys
}

/// See the module documentation.
#[derive(Debug, Clone)]
pub struct Protection {
    pub metrics: Arc<Metrics>,
    pub readiness: Arc<Readiness>,
    pub validator: Arc<Validator>,
    pub forwarding: Forwarding,
    /// Named in challenges and served as RFC 9728 metadata.
    pub resource: Arc<Resource>,
    responder: Responder,
    inbound: crate::config::Inbound,
}

impl Protection {
    /// Builds the validator and, in exchange mode, the exchanger, and starts their background
    /// work (discovery, keys, token endpoint). Needs a tokio runtime.
    pub fn start(config: &Config) -> Result<Self, SetupError> {
        let metrics = Arc::new(Metrics::default());
        let readiness = Arc::new(Readiness::default());
        let idp = IdpClient::new(&config.idp_tls)?;
        let timing = inbound::Timing {
            // In exchange mode the exchanged-token cache entry carries the acceptance.
            remember_accepted: config.mode != Mode::Exchange,
            ..inbound::Timing::default()
        };
        let validator = Arc::new(Validator::with_timing(
            &config.inbound,
            idp.clone(),
            metrics.clone(),
            readiness.clone(),
            timing,
        ));
        let forwarding = match config.mode {
            Mode::Passthrough => Forwarding::Passthrough,
            Mode::Exchange => {
                let exchange = config
                    .exchange
                    .as_ref()
                    .ok_or(SetupError::ExchangeUnconfigured)?;
                let issued_keys =
                    issued_keys(config, exchange, &validator, &idp, &metrics, &readiness);
                let exchanger = Arc::new(
                    Exchanger::new(
                        exchange,
                        &config.cache,
                        idp,
                        metrics.clone(),
                        readiness.clone(),
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
        let resource = Arc::new(Resource::from_config(config));
        Ok(Self {
            responder: Responder::new(resource.clone(), metrics.clone()),
            metrics,
            readiness,
            validator,
            forwarding,
            resource,
            inbound: config.inbound.clone(),
        })
    }

    /// The validation layer; in exchange mode it accepts a token seen before by the
    /// acceptance its exchanged-token cache entry carries.
    pub fn bearer_auth(&self) -> BearerAuthLayer<Option<Arc<Exchanger>>> {
        BearerAuthLayer::new(
            self.validator.clone(),
            &self.inbound,
            self.responder.clone(),
        )
        .recall(self.exchanger().cloned())
    }

    /// The exchange layer; `None` in passthrough mode.
    pub fn token_exchange(&self) -> Option<TokenExchangeLayer> {
        self.exchanger().map(|e| {
            TokenExchangeLayer::new(
                e.clone(),
                self.validator.clone(),
                self.responder.clone(),
                self.inbound.max_token_bytes,
            )
        })
    }

    /// Forgets every cached exchange and validation decision of client tokens whose `sub` is
    /// `sub` (`None`: everything); returns how many entries went from both caches, and counts
    /// them in `txp_cache_purged_total` (README "Admin endpoints").
    pub async fn purge(&self, sub: Option<&str>) -> u64 {
        let mut purged = self.validator.purge(sub).await;
        if let Some(exchanger) = self.exchanger() {
            purged += exchanger.purge(sub).await;
        }
        self.metrics
            .cache_purged
            .fetch_add(purged, std::sync::atomic::Ordering::Relaxed);
        purged
    }

    /// The exchanger, in exchange mode.
    pub fn exchanger(&self) -> Option<&Arc<Exchanger>> {
        match &self.forwarding {
            Forwarding::Exchange(e) => Some(e),
            Forwarding::Passthrough => None,
        }
    }

    /// The responder the layers refuse requests with.
    pub fn responder(&self) -> &Responder {
        &self.responder
    }
}
