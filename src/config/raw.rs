//! The config file as written: every key optional, unknown keys rejected.
//!
//! These types mirror the YAML layout of README "Configuration reference" one to one. They carry no defaults
//! and no validation; [`super::validate`] turns them into a [`super::Config`].

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The whole file.
#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub listen: Option<String>,
    pub admin_listen: Option<String>,
    pub mode: Option<String>,
    pub public_url: Option<String>,
    pub tls: Option<RawTls>,
    pub telemetry: Option<RawTelemetry>,
    pub trusted_proxies: Option<Vec<String>>,
    pub cors: Option<RawCors>,
    #[serde(default)]
    pub upstream: RawUpstream,
    pub inbound: Option<RawInbound>,
    pub exchange: Option<RawExchange>,
    pub profiles: Option<Vec<RawProfile>>,
    #[serde(default)]
    pub idp_tls: RawIdpTls,
    #[serde(default)]
    pub cache: RawCache,
    #[serde(default)]
    pub protected_resource: RawProtectedResource,
    #[serde(default)]
    pub shutdown: RawShutdown,
    #[serde(default)]
    pub log: RawLog,
}

#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawProfile {
    pub name: Option<String>,
    pub inbound: Option<RawInbound>,
    pub exchange: Option<RawExchange>,
}

#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawCors {
    pub allowed_origins: Option<Vec<String>>,
    pub max_age: Option<String>,
}

/// `tls`: HTTPS on the proxy listener (README "HTTPS").
#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    pub cert_file: Option<String>,
    pub key_file: Option<String>,
}

/// `telemetry`: traces exported over OTLP/HTTP (README "Traces").
#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawTelemetry {
    pub otlp_endpoint: Option<String>,
    pub service_name: Option<String>,
    pub sample_ratio: Option<f64>,
}

#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstream {
    pub url: Option<String>,
    pub connect_timeout: Option<String>,
    pub response_header_timeout: Option<String>,
    pub idle_timeout: Option<String>,
    pub pool_idle_timeout: Option<String>,
    pub preserve_host: Option<bool>,
}

#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawInbound {
    pub issuer: Option<String>,
    pub discovery_url: Option<String>,
    pub jwks_uri: Option<String>,
    pub audiences: Option<Vec<String>>,
    pub algorithms: Option<Vec<String>>,
    pub leeway: Option<String>,
    pub required_scopes: Option<Vec<String>>,
    pub max_token_bytes: Option<usize>,
    pub introspection: Option<RawIntrospection>,
    pub public_paths: Option<Vec<String>>,
    pub stream_lifetime: Option<String>,
}

#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawIntrospection {
    pub endpoint: Option<String>,
    pub client_id: Option<String>,
    pub client_secret_file: Option<String>,
}

#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawExchange {
    pub grant: Option<String>,
    pub token_endpoint: Option<String>,
    pub issuer: Option<String>,
    pub client_id: Option<String>,
    #[serde(default)]
    pub client_auth: RawClientAuth,
    pub audience: Option<Vec<String>>,
    pub resource: Option<Vec<String>>,
    pub scope: Option<String>,
    pub subject_token_type: Option<String>,
    pub requested_token_type: Option<String>,
    pub extra_params: Option<BTreeMap<String, String>>,
    pub timeout: Option<String>,
    pub max_concurrent: Option<usize>,
    pub negative_ttl: Option<String>,
    pub verify_issued: Option<String>,
}

#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawClientAuth {
    pub method: Option<String>,
    pub secret_file: Option<String>,
    pub private_key_file: Option<String>,
    pub key_id: Option<String>,
    pub certificate_file: Option<String>,
    pub assertion_file: Option<String>,
}

#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawIdpTls {
    pub ca_file: Option<String>,
    pub allow_plain_http: Option<bool>,
}

#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawCache {
    pub max_entries: Option<u64>,
    pub max_ttl: Option<String>,
    pub expiry_margin: Option<String>,
    pub refresh_ahead: Option<String>,
    pub stale_if_error: Option<bool>,
}

#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawProtectedResource {
    pub resource: Option<String>,
    pub authorization_servers: Option<Vec<String>>,
    pub scopes_supported: Option<Vec<String>>,
}

#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawShutdown {
    pub drain_delay: Option<String>,
    pub timeout: Option<String>,
}

/// The file-level equivalent of `--log-format` and `--log-level`.
#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawLog {
    pub format: Option<String>,
    pub level: Option<String>,
}
