//! `check-config --online`: after the offline checks, what only the IdP can tell (README
//! "Start-up and online checks").
//!
//! Fetches discovery and the JWKS, reads every secret, key and assertion file, and probes the
//! token endpoint with a deliberately invalid subject token ([`Exchanger::probe`]): an answer
//! refusing the proxy's own client (`invalid_client`, `unauthorized_client`,
//! `unsupported_grant_type`, HTTP 401) means the proxy cannot exchange anything. Each failure
//! names what failed (`discovery`, `jwks`, the config key of a file, `token_endpoint`;
//! prefixed `<profile>/` with several profiles, README "Several issuers") and why, never a
//! secret.

use std::sync::Arc;

use crate::config::{ClientAuth, Config, Inbound, Mode, Profile};
use crate::exchange::{Exchanger, ExchangerOptions, SetupError};
use crate::idp::{self, IdpClient};
use crate::inbound::jwks::{JwkSetDocument, KeySet};
use crate::metrics::Metrics;
use crate::readiness::Readiness;
use crate::secret::SecretFile;

/// One failed online check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// `discovery`, `jwks`, a config key, or `token_endpoint`.
    pub what: String,
    /// Why, in a few words; never a secret.
    pub why: String,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "online check failed: {}: {}", self.what, self.why)
    }
}

fn failure(what: &str, why: impl std::fmt::Display) -> Failure {
    Failure {
        what: what.to_owned(),
        why: why.to_string(),
    }
}

/// Runs every online check of `config`, profile by profile; an empty list means all passed.
pub async fn check(config: &Config) -> Vec<Failure> {
    let mut failures = Vec::new();
    let idp = match IdpClient::new(&config.idp_tls) {
        Ok(c) => c,
        Err(e) => return vec![failure("idp_tls.ca_file", e)],
    };
    for (index, profile) in config.profiles.iter().enumerate() {
        let mut found = Vec::new();
        check_profile(config, profile, index, &idp, &mut found).await;
        if !profile.name.is_empty() {
            for f in &mut found {
                f.what = format!("{}/{}", profile.name, f.what);
            }
        }
        failures.append(&mut found);
    }
    failures
}

/// The checks of one profile, named without the profile.
async fn check_profile(
    config: &Config,
    profile: &Profile,
    index: usize,
    idp: &IdpClient,
    failures: &mut Vec<Failure>,
) {
    keys(&profile.inbound, idp, failures).await;
    if let Some(introspection) = &profile.inbound.introspection
        && let Some(path) = &introspection.client_secret_file
        && let Err(e) = SecretFile::new(path.clone()).get().await
    {
        failures.push(failure("inbound.introspection.client_secret_file", e));
    }
    if let (Mode::Exchange, Some(exchange)) = (config.mode, &profile.exchange) {
        let options = ExchangerOptions {
            probe: false,
            ..ExchangerOptions::default()
        };
        let built = Exchanger::for_profile(
            exchange,
            &config.cache,
            idp.clone(),
            Arc::new(Metrics::default()),
            Arc::new(Readiness::default()),
            options,
            index,
            &profile.name,
        );
        match built {
            Ok(exchanger) => {
                if let Err(e) = exchanger.probe().await {
                    failures.push(failure("token_endpoint", e));
                }
            }
            Err(SetupError::Credentials(e)) => {
                failures.push(failure(credential_key(&exchange.client_auth), e));
            }
        }
    }
}

/// Discovery (when the JWKS location is not configured) and the JWKS itself.
async fn keys(inbound: &Inbound, idp: &IdpClient, failures: &mut Vec<Failure>) {
    let jwks_uri = match &inbound.jwks_uri {
        Some(uri) => uri.clone(),
        None => match idp::discover(idp, &inbound.issuer, inbound.discovery_url.as_ref()).await {
            Ok(meta) => match meta.jwks_uri {
                Some(uri) => uri,
                None => {
                    failures.push(failure("discovery", "the document names no jwks_uri"));
                    return;
                }
            },
            Err(e) => {
                failures.push(failure("discovery", e));
                return;
            }
        },
    };
    match idp.get_json::<JwkSetDocument>(&jwks_uri).await {
        Ok((doc, _)) => {
            let (set, _) = KeySet::from_document(&doc);
            if set.is_empty() {
                failures.push(failure("jwks", "no usable signing key"));
            }
        }
        Err(e) => failures.push(failure("jwks", e)),
    }
}

/// The config key of the file that `exchange.client_auth` reads.
fn credential_key(auth: &ClientAuth) -> &'static str {
    match auth {
        ClientAuth::ClientSecretBasic { .. } | ClientAuth::ClientSecretPost { .. } => {
            "exchange.client_auth.secret_file"
        }
        ClientAuth::PrivateKeyJwt { .. } => "exchange.client_auth.private_key_file",
        ClientAuth::ClientAssertionFile { .. } => "exchange.client_auth.assertion_file",
        ClientAuth::None => "exchange.client_auth",
    }
}
