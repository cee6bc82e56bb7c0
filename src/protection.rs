//! [`Protection`]: the validator, the exchanger and what they share, built from the config
//! and started; the source of the two layers, for the proxy binary and for a server that
//! embeds them (README "Use as a library").

use std::sync::Arc;

use crate::config::{Config, Mode};
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
                let exchanger = Arc::new(Exchanger::new(
                    exchange,
                    &config.cache,
                    idp,
                    metrics.clone(),
                    readiness.clone(),
                )?);
                exchanger.start();
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
