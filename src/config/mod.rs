//! Configuration: the YAML file, the command line and the environment, merged and validated
//! before any socket is bound.
//!
//! [`load`] reads the file into [`raw::RawConfig`] (unknown keys rejected), layers the
//! command-line and environment [`Options`] over it, and [`validate`]s the result into a
//! [`Config`]. Every problem is collected, so one run reports all of them, one line each,
//! naming the key. No error message echoes a value that could be a secret: secrets are only
//! ever file paths here, and the files are not read until the proxy starts.

pub mod raw;

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;
use url::Url;

use crate::cli::Options;
use raw::RawConfig;

/// Proxy listener when none is configured: all interfaces, the conventional sidecar port.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:8080";
/// Admin listener: a separate port so that probes and scrapes never need a token.
pub const DEFAULT_ADMIN_LISTEN: &str = "0.0.0.0:9090";
/// A backend in the same pod accepts a connection at once; five seconds means it is not there.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Long enough for a slow tool call to start answering, short enough to free a stuck client.
pub const DEFAULT_RESPONSE_HEADER_TIMEOUT: Duration = Duration::from_secs(60);
/// Below the keep-alive timeout of the servers backends run on (uvicorn 5 s, gunicorn 2 s,
/// Node 5 s), so the proxy closes an idle backend connection before the backend does.
pub const DEFAULT_POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(1);
/// Clock skew tolerated on `exp`, `nbf` and `iat`.
pub const DEFAULT_LEEWAY: Duration = Duration::from_secs(30);
/// Real access tokens are 1–3 KiB; anything far larger is an attack on the parser.
pub const DEFAULT_MAX_TOKEN_BYTES: usize = 8192;
/// The IdP answers a token request in well under a second when it is healthy.
pub const DEFAULT_EXCHANGE_TIMEOUT: Duration = Duration::from_secs(5);
/// Calls to the token endpoint at once: far above a healthy IdP's needs (a cached token costs
/// none), low enough that a burst of new tokens cannot flood it.
pub const DEFAULT_EXCHANGE_MAX_CONCURRENT: usize = 64;
/// How long an IdP's refusal of a subject token is remembered: retries with the same token
/// get the same answer without an IdP call; short, as a refusal may be fixed at the IdP.
pub const DEFAULT_NEGATIVE_TTL: Duration = Duration::from_secs(10);
/// Enough for every active user of one backend; about 1 KiB each.
pub const DEFAULT_CACHE_MAX_ENTRIES: u64 = 100_000;
/// Bounds how long a revoked subject token can still be honoured through the cache.
pub const DEFAULT_CACHE_MAX_TTL: Duration = Duration::from_secs(300);
/// A token handed to the backend must outlive the request that carries it.
pub const DEFAULT_CACHE_EXPIRY_MARGIN: Duration = Duration::from_secs(15);
/// How long a browser may keep a CORS preflight answer.
pub const DEFAULT_CORS_MAX_AGE: Duration = Duration::from_secs(600);
/// An entry used this close to the end of its serving window is exchanged again in the
/// background: long enough for a slow IdP to answer before the entry runs out.
pub const DEFAULT_REFRESH_AHEAD: Duration = Duration::from_secs(30);
/// Longest duration any key accepts: far beyond any sensible timeout, delay or cache lifetime,
/// and far below where deadline arithmetic (`Instant` + duration) could overflow.
pub const MAX_DURATION: Duration = Duration::from_secs(30 * 24 * 3600);
/// How often `tls.cert_file` and `tls.key_file` are looked at: a renewed certificate is
/// served within two polls, and reading two small files every few seconds costs nothing.
pub const DEFAULT_TLS_POLL_INTERVAL: Duration = Duration::from_secs(5);
/// The `service.name` traces are reported under: the binary's name.
pub const DEFAULT_SERVICE_NAME: &str = "token-exchange-proxy";
/// Every request traced: a sidecar's traffic is modest, and a collector can sample further.
pub const DEFAULT_SAMPLE_RATIO: f64 = 1.0;
/// Time for the endpoints controller to take the pod out of the Service after SIGTERM.
pub const DEFAULT_DRAIN_DELAY: Duration = Duration::from_secs(5);
/// Fits in Kubernetes' default 30 s grace period together with the drain delay.
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(25);
/// The RFC 8693 token type of an OAuth access token (RFC 8693 §3).
pub const ACCESS_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:access_token";
/// Asymmetric algorithms only: `none` and HMAC can never verify a third party's token.
pub const DEFAULT_ALGORITHMS: &[&str] = &[
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA",
];

/// Whether the client token is exchanged or forwarded as it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Validate, exchange (RFC 8693), forward with the exchanged token.
    Exchange,
    /// Validate and forward the client's own token.
    Passthrough,
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Json,
    Text,
}

/// How the proxy authenticates itself at the token endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "method", rename_all = "snake_case")]
pub enum ClientAuth {
    /// HTTP Basic with the form-urlencoded id and secret (RFC 6749 §2.3.1).
    ClientSecretBasic { secret_file: PathBuf },
    /// `client_id` and `client_secret` in the form body (RFC 6749 §2.3.1).
    ClientSecretPost { secret_file: PathBuf },
    /// A JWT assertion signed with the proxy's private key (RFC 7523 §2.2).
    PrivateKeyJwt {
        private_key_file: PathBuf,
        key_id: Option<String>,
        /// The key's X.509 certificate (PEM): its thumbprints go in the assertion's header as
        /// `x5t` and `x5t#S256` (RFC 7515 §4.1.7–8), as Microsoft Entra ID requires.
        certificate_file: Option<PathBuf>,
    },
    /// A ready-made assertion (e.g. a projected service-account token), read on every use.
    ClientAssertionFile { assertion_file: PathBuf },
    /// Public client: only `client_id` is sent.
    None,
}

/// The validated configuration.
#[derive(Debug, Clone, Serialize)]
pub struct Config {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub mode: Mode,
    pub public_url: Option<Url>,
    /// `None`: plain HTTP (HTTP/1.1 and h2c) on `listen`.
    pub tls: Option<Tls>,
    pub telemetry: Telemetry,
    /// Peers whose `X-Forwarded-*` and `Forwarded` headers are kept (e.g. the ingress).
    #[serde(serialize_with = "ser_nets")]
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// `None`: no CORS handling at all.
    pub cors: Option<Cors>,
    pub upstream: Upstream,
    /// The issuers whose tokens are accepted, each with its rules and exchange: the named
    /// `profiles`, or the one made of the top-level `inbound` and `exchange` sections.
    #[serde(flatten)]
    pub profiles: Profiles,
    pub idp_tls: IdpTls,
    pub cache: Cache,
    pub protected_resource: ProtectedResource,
    pub shutdown: Shutdown,
    pub log: Log,
}

impl Config {
    /// The first profile's `inbound` (the only one without `profiles`).
    pub fn inbound(&self) -> &Inbound {
        &self.profiles[0].inbound
    }

    /// The first profile's `exchange` (the only one without `profiles`); `None` in
    /// passthrough mode.
    pub fn exchange(&self) -> Option<&Exchange> {
        self.profiles[0].exchange.as_ref()
    }
}

/// One issuer whose tokens are accepted, with its validation rules and its exchange
/// (README "Several issuers").
#[derive(Debug, Clone, Serialize)]
pub struct Profile {
    /// `[a-z0-9-]+`, or empty for the one-profile form; a metric label.
    pub name: String,
    pub inbound: Inbound,
    /// `None` in passthrough mode.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exchange: Option<Exchange>,
}

/// The profiles, never empty: printed as `profiles:` when they are named, else as the
/// top-level `inbound` and `exchange` they came from.
#[derive(Debug, Clone)]
pub struct Profiles(pub Vec<Profile>);

impl std::ops::Deref for Profiles {
    type Target = [Profile];

    fn deref(&self) -> &[Profile] {
        &self.0
    }
}

impl Profiles {
    /// Whether they are named `profiles` (else the one-profile form).
    pub fn named(&self) -> bool {
        self.0.iter().any(|p| !p.name.is_empty())
    }
}

impl Serialize for Profiles {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap as _;
        let mut map = s.serialize_map(None)?;
        match self.0.as_slice() {
            [one] if !self.named() => {
                map.serialize_entry("inbound", &one.inbound)?;
                if let Some(e) = &one.exchange {
                    map.serialize_entry("exchange", e)?;
                }
            }
            all => map.serialize_entry("profiles", all)?,
        }
        map.end()
    }
}

/// `exchange.grant`: how the proxy asks for the backend's token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Grant {
    /// OAuth 2.0 Token Exchange (RFC 8693).
    TokenExchange,
    /// Microsoft Entra ID On-Behalf-Of: the JWT bearer grant (RFC 7523 §2.1) with
    /// `requested_token_use=on_behalf_of`.
    JwtBearerObo,
}

/// `cors.*`: browser clients (e.g. the MCP Inspector in a browser).
#[derive(Debug, Clone, Serialize)]
pub struct Cors {
    /// Exact origins (`https://app.example.com`), or `*` for any.
    pub allowed_origins: Vec<String>,
    #[serde(serialize_with = "ser_duration")]
    pub max_age: Duration,
}

/// `tls.*`: HTTPS on the proxy listener (README "HTTPS"). The files are read when the proxy
/// starts (and by `check-config`), then re-read when they change.
#[derive(Debug, Clone, Serialize)]
pub struct Tls {
    /// PEM certificate chain, end-entity certificate first.
    pub cert_file: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) of the first certificate.
    pub key_file: PathBuf,
    /// How often the files are looked at; not a config key ([`DEFAULT_TLS_POLL_INTERVAL`];
    /// tests shorten it).
    #[serde(skip)]
    pub poll_interval: Duration,
}

/// `telemetry.*`: traces (README "Traces").
#[derive(Debug, Clone, Serialize)]
pub struct Telemetry {
    /// The OTLP/HTTP collector's base URL; spans go to `<otlp_endpoint>/v1/traces`. `None`:
    /// no traces, and nothing on the request path looks at them.
    pub otlp_endpoint: Option<Url>,
    pub service_name: String,
    /// Share of traces started here that are recorded (0.0–1.0); a client's `traceparent`
    /// decision is followed (W3C Trace Context `sampled` flag).
    pub sample_ratio: f64,
}

/// `upstream.*`
#[derive(Debug, Clone, Serialize)]
pub struct Upstream {
    pub url: Url,
    #[serde(serialize_with = "ser_duration")]
    pub connect_timeout: Duration,
    #[serde(serialize_with = "ser_duration")]
    pub response_header_timeout: Duration,
    /// `None` when configured as 0: no limit on silence inside a body.
    #[serde(serialize_with = "ser_opt_duration")]
    pub idle_timeout: Option<Duration>,
    /// How long an idle pooled backend connection is kept; zero: none is kept.
    #[serde(serialize_with = "ser_duration")]
    pub pool_idle_timeout: Duration,
    pub preserve_host: bool,
}

/// `inbound.*`
#[derive(Debug, Clone, Serialize)]
pub struct Inbound {
    pub issuer: String,
    pub discovery_url: Option<Url>,
    pub jwks_uri: Option<Url>,
    pub audiences: Vec<String>,
    pub algorithms: Vec<jsonwebtoken::Algorithm>,
    #[serde(serialize_with = "ser_duration")]
    pub leeway: Duration,
    pub required_scopes: Vec<String>,
    pub max_token_bytes: usize,
    pub introspection: Option<Introspection>,
    pub public_paths: Vec<String>,
    pub stream_lifetime: StreamLifetime,
}

/// `inbound.stream_lifetime`: how long an event stream (a GET answered `text/event-stream`)
/// may outlive the client token it was opened with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StreamLifetime {
    /// It ends, after a complete event, when the token expires (plus leeway).
    Token,
    /// As long as the backend keeps it open.
    Unlimited,
}

/// `inbound.introspection.*`
#[derive(Debug, Clone, Serialize)]
pub struct Introspection {
    pub endpoint: Option<Url>,
    pub client_id: String,
    pub client_secret_file: Option<PathBuf>,
}

/// `exchange.*`
#[derive(Debug, Clone, Serialize)]
pub struct Exchange {
    pub grant: Grant,
    pub token_endpoint: Option<Url>,
    pub issuer: String,
    pub client_id: String,
    pub client_auth: ClientAuth,
    pub audience: Vec<String>,
    pub resource: Vec<String>,
    pub scope: Option<String>,
    pub subject_token_type: String,
    pub requested_token_type: String,
    pub extra_params: BTreeMap<String, String>,
    #[serde(serialize_with = "ser_duration")]
    pub timeout: Duration,
    /// Token-endpoint calls in flight at most; more wait (within `timeout`).
    pub max_concurrent: usize,
    /// How long a refusal of a subject token is remembered (zero: not at all).
    #[serde(serialize_with = "ser_duration")]
    pub negative_ttl: Duration,
    /// Whether the issued token is verified before it is used.
    pub verify_issued: VerifyIssued,
}

/// `exchange.verify_issued`: whether the token the IdP issued is verified before use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum VerifyIssued {
    /// When it is a JWT and the exchange issuer's keys are known.
    Auto,
    /// Always: an opaque token, or one that cannot be verified (yet), is refused.
    Always,
    /// Never: the IdP's answer is trusted as it is.
    Never,
}

/// `idp_tls.*`
#[derive(Debug, Clone, Serialize)]
pub struct IdpTls {
    pub ca_file: Option<PathBuf>,
    pub allow_plain_http: bool,
}

/// `cache.*`
#[derive(Debug, Clone, Serialize)]
pub struct Cache {
    pub max_entries: u64,
    #[serde(serialize_with = "ser_duration")]
    pub max_ttl: Duration,
    #[serde(serialize_with = "ser_duration")]
    pub expiry_margin: Duration,
    /// Zero: no refresh ahead.
    #[serde(serialize_with = "ser_duration")]
    pub refresh_ahead: Duration,
    pub stale_if_error: bool,
}

/// `protected_resource.*` (RFC 9728).
#[derive(Debug, Clone, Serialize)]
pub struct ProtectedResource {
    pub resource: Option<String>,
    pub authorization_servers: Vec<String>,
    pub scopes_supported: Vec<String>,
}

/// `shutdown.*`
#[derive(Debug, Clone, Serialize)]
pub struct Shutdown {
    #[serde(serialize_with = "ser_duration")]
    pub drain_delay: Duration,
    #[serde(serialize_with = "ser_duration")]
    pub timeout: Duration,
}

/// `log.*` (also `--log-format`, `--log-level`).
#[derive(Debug, Clone, Serialize)]
pub struct Log {
    pub format: LogFormat,
    pub level: String,
}

fn ser_duration<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&humantime::format_duration(*d).to_string())
}

fn ser_nets<S: serde::Serializer>(nets: &[ipnet::IpNet], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(nets.iter().map(ToString::to_string))
}

fn ser_opt_duration<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    ser_duration(&d.unwrap_or_default(), s)
}

/// One thing wrong with the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The config key (dotted path), e.g. `upstream.url`.
    pub key: String,
    /// Why, in a few words; never the value of a secret.
    pub message: String,
}

/// Everything wrong with the configuration; displayed one problem per line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "config error: {}: {}", p.key, p.message)?;
        }
        Ok(())
    }
}

/// Reads the file named by `options.config` (if any), layers `options` over it, validates.
pub fn load(options: &Options) -> Result<Config, ConfigError> {
    let raw = match &options.config {
        Some(path) => read_file(path)?,
        None => RawConfig::default(),
    };
    validate(apply(raw, options))
}

/// Parses a YAML config file. Problems name the file and the offending key.
pub fn read_file(path: &Path) -> Result<RawConfig, ConfigError> {
    let one = |message: String| ConfigError {
        problems: vec![Problem {
            key: "config".into(),
            message,
        }],
    };
    let text = std::fs::read_to_string(path)
        .map_err(|e| one(format!("cannot read {}: {}", path.display(), e.kind())))?;
    parse_yaml(&text).map_err(|message| one(format!("{}: {message}", path.display())))
}

/// Parses YAML text into the raw config. An empty document is an empty config.
pub fn parse_yaml(text: &str) -> Result<RawConfig, String> {
    if text.trim().is_empty() {
        return Ok(RawConfig::default());
    }
    // serde's messages name the unknown field and the expected ones, plus a position. They
    // quote keys, never values, except for type errors on scalars, which are not secrets here
    // (secrets only ever appear as file paths).
    serde_yaml_ng::from_str(text).map_err(|e| e.to_string())
}

/// Layers command-line/environment options over the file's values.
pub fn apply(mut raw: RawConfig, o: &Options) -> RawConfig {
    fn set<T: Clone>(slot: &mut Option<T>, v: &Option<T>) {
        if let Some(v) = v {
            *slot = Some(v.clone());
        }
    }
    fn set_list(slot: &mut Option<Vec<String>>, v: &[String]) {
        if !v.is_empty() {
            *slot = Some(v.to_vec());
        }
    }
    set(&mut raw.listen, &o.listen);
    set(&mut raw.admin_listen, &o.admin_listen);
    set(&mut raw.mode, &o.mode);
    set(&mut raw.upstream.url, &o.upstream);
    // The inbound and exchange options write into the top-level sections (creating them):
    // with `profiles`, that is a conflict validation reports.
    if o.issuer.is_some() || !o.audience.is_empty() {
        let i = raw.inbound.get_or_insert_with(Default::default);
        set(&mut i.issuer, &o.issuer);
        set_list(&mut i.audiences, &o.audience);
    }
    let exchange_options = o.token_endpoint.is_some()
        || o.client_id.is_some()
        || o.client_secret_file.is_some()
        || !o.exchange_audience.is_empty()
        || !o.exchange_resource.is_empty()
        || o.exchange_scope.is_some();
    if exchange_options {
        let e = raw.exchange.get_or_insert_with(Default::default);
        set(&mut e.token_endpoint, &o.token_endpoint);
        set(&mut e.client_id, &o.client_id);
        set(&mut e.client_auth.secret_file, &o.client_secret_file);
        set_list(&mut e.audience, &o.exchange_audience);
        set_list(&mut e.resource, &o.exchange_resource);
        set(&mut e.scope, &o.exchange_scope);
    }
    set(&mut raw.log.format, &o.log_format);
    set(&mut raw.log.level, &o.log_level);
    raw
}

/// Collects problems while building a [`Config`].
#[derive(Default)]
struct Checker {
    problems: Vec<Problem>,
}

impl Checker {
    fn problem(&mut self, key: &str, message: impl Into<String>) {
        self.problems.push(Problem {
            key: key.into(),
            message: message.into(),
        });
    }

    fn addr(&mut self, key: &str, v: Option<&str>, default: &str) -> SocketAddr {
        let v = v.unwrap_or(default);
        v.parse().unwrap_or_else(|_| {
            self.problem(key, "not a socket address (expected e.g. 0.0.0.0:8080)");
            SocketAddr::from(([0, 0, 0, 0], 0))
        })
    }

    /// A duration of at most [`MAX_DURATION`]; `default` when absent (or refused).
    fn duration(&mut self, key: &str, v: Option<&str>, default: Duration) -> Duration {
        match v.map(parse_duration) {
            None => default,
            Some(None) => {
                self.problem(key, "not a duration (expected e.g. 500ms, 30s, 5m)");
                default
            }
            Some(Some(d)) if d > MAX_DURATION => {
                self.problem(key, "must be at most 30 days");
                default
            }
            Some(Some(d)) => d,
        }
    }

    /// An absolute http(s) URL. `idp` URLs must be https unless loopback or allowed.
    fn url(&mut self, key: &str, v: &str, idp_plain_ok: Option<bool>) -> Option<Url> {
        let url = match Url::parse(v) {
            Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => u,
            Ok(_) => {
                self.problem(key, "must be an http:// or https:// URL with a host");
                return None;
            }
            Err(e) => {
                self.problem(key, format!("not a URL: {e}"));
                return None;
            }
        };
        if !url.username().is_empty() || url.password().is_some() {
            self.problem(key, "must not contain credentials");
            return None;
        }
        if let Some(allow) = idp_plain_ok
            && url.scheme() == "http"
            && !allow
            && !is_loopback(&url)
        {
            self.problem(
                key,
                "plain http to a non-loopback IdP is refused (use https, or set idp_tls.allow_plain_http)",
            );
            return None;
        }
        Some(url)
    }

    fn opt_url(&mut self, key: &str, v: Option<&str>, idp_plain_ok: Option<bool>) -> Option<Url> {
        v.and_then(|v| self.url(key, v, idp_plain_ok))
    }

    fn required<'a>(&mut self, key: &str, v: Option<&'a str>) -> Option<&'a str> {
        match v {
            Some(s) if !s.trim().is_empty() => Some(s),
            _ => {
                self.problem(key, "required");
                None
            }
        }
    }
}

/// Parses `500ms`, `30s`, `5m`, `1h30m`, or a bare `0`.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    if s == "0" {
        return Some(Duration::ZERO);
    }
    humantime::parse_duration(s).ok()
}

/// True for a public path prefix that every request path falls under: `/`, and `//`, `///`…,
/// which a backend that merges slashes serves as `/` (see `inbound::is_public_path`).
fn covers_every_path(prefix: &str) -> bool {
    prefix.bytes().all(|b| b == b'/')
}

/// True for `localhost` and loopback IP literals.
pub fn is_loopback(url: &Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    }
}

/// Turns a merged raw config into a [`Config`], or every problem found.
pub fn validate(raw: RawConfig) -> Result<Config, ConfigError> {
    let mut c = Checker::default();

    let listen = c.addr("listen", raw.listen.as_deref(), DEFAULT_LISTEN);
    let admin_listen = c.addr(
        "admin_listen",
        raw.admin_listen.as_deref(),
        DEFAULT_ADMIN_LISTEN,
    );
    if listen == admin_listen && listen.port() != 0 {
        c.problem("admin_listen", "must differ from listen");
    }
    let mode = match raw.mode.as_deref() {
        None | Some("exchange") => Mode::Exchange,
        Some("passthrough") => Mode::Passthrough,
        Some(_) => {
            c.problem("mode", "must be exchange or passthrough");
            Mode::Exchange
        }
    };
    let public_url = c.opt_url("public_url", raw.public_url.as_deref(), None);
    if let Some(u) = &public_url
        && (u.query().is_some() || u.fragment().is_some())
    {
        c.problem("public_url", "must not have a query or fragment");
    }

    let trusted_proxies = trusted_proxies(&mut c, raw.trusted_proxies.as_deref());
    let cors = raw.cors.as_ref().map(|rc| cors(&mut c, rc));
    let tls = raw.tls.as_ref().map(|t| Tls {
        cert_file: PathBuf::from(
            c.required("tls.cert_file", t.cert_file.as_deref())
                .unwrap_or_default(),
        ),
        key_file: PathBuf::from(
            c.required("tls.key_file", t.key_file.as_deref())
                .unwrap_or_default(),
        ),
        poll_interval: DEFAULT_TLS_POLL_INTERVAL,
    });
    let telemetry = telemetry(&mut c, raw.telemetry.as_ref());

    let allow_plain_http = raw.idp_tls.allow_plain_http.unwrap_or(false);
    let idp = Some(allow_plain_http);

    // upstream
    let u = &raw.upstream;
    let upstream_url = c
        .required("upstream.url", u.url.as_deref())
        .and_then(|v| c.url("upstream.url", v, None));
    if let Some(url) = &upstream_url {
        if url.scheme() != "http" {
            c.problem(
                "upstream.url",
                "must be http:// (the backend runs in the same pod; TLS to it is not supported)",
            );
        }
        if url.path() != "/" || url.query().is_some() {
            c.problem(
                "upstream.url",
                "must be a scheme and authority only; request paths are forwarded unchanged",
            );
        }
    }
    let connect_timeout = c.duration(
        "upstream.connect_timeout",
        u.connect_timeout.as_deref(),
        DEFAULT_CONNECT_TIMEOUT,
    );
    let response_header_timeout = c.duration(
        "upstream.response_header_timeout",
        u.response_header_timeout.as_deref(),
        DEFAULT_RESPONSE_HEADER_TIMEOUT,
    );
    for (key, d) in [
        ("upstream.connect_timeout", connect_timeout),
        ("upstream.response_header_timeout", response_header_timeout),
    ] {
        if d.is_zero() {
            c.problem(key, "must be greater than 0");
        }
    }
    let idle_timeout = c.duration(
        "upstream.idle_timeout",
        u.idle_timeout.as_deref(),
        Duration::ZERO,
    );
    let pool_idle_timeout = c.duration(
        "upstream.pool_idle_timeout",
        u.pool_idle_timeout.as_deref(),
        DEFAULT_POOL_IDLE_TIMEOUT,
    );

    let profiles = Profiles(profiles(&mut c, &raw, mode, idp));

    let idp_tls = IdpTls {
        ca_file: raw.idp_tls.ca_file.as_ref().map(PathBuf::from),
        allow_plain_http,
    };

    let cache = Cache {
        max_entries: raw.cache.max_entries.unwrap_or(DEFAULT_CACHE_MAX_ENTRIES),
        max_ttl: c.duration(
            "cache.max_ttl",
            raw.cache.max_ttl.as_deref(),
            DEFAULT_CACHE_MAX_TTL,
        ),
        expiry_margin: c.duration(
            "cache.expiry_margin",
            raw.cache.expiry_margin.as_deref(),
            DEFAULT_CACHE_EXPIRY_MARGIN,
        ),
        refresh_ahead: c.duration(
            "cache.refresh_ahead",
            raw.cache.refresh_ahead.as_deref(),
            DEFAULT_REFRESH_AHEAD,
        ),
        stale_if_error: raw.cache.stale_if_error.unwrap_or(true),
    };

    // Either of these would keep no exchanged token usable: every request would call the IdP.
    if cache.max_entries == 0 {
        c.problem(
            "cache.max_entries",
            "must be greater than 0 (with 0 every request calls the IdP)",
        );
    }
    if cache.expiry_margin >= cache.max_ttl {
        c.problem(
            "cache.expiry_margin",
            "must be less than cache.max_ttl (else no cached token is ever served and every request calls the IdP)",
        );
    }

    let pr = &raw.protected_resource;
    if let Some(r) = &pr.resource {
        c.url("protected_resource.resource", r, None);
    }
    let protected_resource = ProtectedResource {
        resource: pr.resource.clone(),
        authorization_servers: pr
            .authorization_servers
            .clone()
            .unwrap_or_else(|| profiles.iter().map(|p| p.inbound.issuer.clone()).collect()),
        scopes_supported: pr.scopes_supported.clone().unwrap_or_default(),
    };

    let shutdown = Shutdown {
        drain_delay: c.duration(
            "shutdown.drain_delay",
            raw.shutdown.drain_delay.as_deref(),
            DEFAULT_DRAIN_DELAY,
        ),
        timeout: c.duration(
            "shutdown.timeout",
            raw.shutdown.timeout.as_deref(),
            DEFAULT_SHUTDOWN_TIMEOUT,
        ),
    };

    let format = match raw.log.format.as_deref() {
        None | Some("json") => LogFormat::Json,
        Some("text") => LogFormat::Text,
        Some(_) => {
            c.problem("log.format", "must be text or json");
            LogFormat::Json
        }
    };
    let level = raw.log.level.clone().unwrap_or_else(|| "info".into());
    if tracing_subscriber::EnvFilter::try_new(&level).is_err() {
        c.problem(
            "log.level",
            "not a valid tracing filter (e.g. info,token_exchange_proxy=debug)",
        );
    }

    if !c.problems.is_empty() {
        return Err(ConfigError {
            problems: c.problems,
        });
    }
    let (Some(url), false) = (upstream_url, profiles.is_empty()) else {
        // Unreachable: a missing required value was recorded as a problem above.
        return Err(ConfigError {
            problems: vec![Problem {
                key: "config".into(),
                message: "incomplete".into(),
            }],
        });
    };
    Ok(Config {
        listen,
        admin_listen,
        mode,
        public_url,
        tls,
        telemetry,
        trusted_proxies,
        cors,
        upstream: Upstream {
            url,
            connect_timeout,
            response_header_timeout,
            idle_timeout: (!idle_timeout.is_zero()).then_some(idle_timeout),
            pool_idle_timeout,
            preserve_host: u.preserve_host.unwrap_or(false),
        },
        profiles,
        idp_tls,
        cache,
        protected_resource,
        shutdown,
        log: Log { format, level },
    })
}

/// The `inbound` section (of a profile: `prefix` names it in problems, e.g.
/// `profiles.corp.`). `None` without an issuer (a problem is recorded).
fn inbound_section(
    c: &mut Checker,
    prefix: &str,
    i: &raw::RawInbound,
    idp: Option<bool>,
) -> Option<Inbound> {
    let k = |key: &str| format!("{prefix}{key}");
    let issuer = c
        .required(&k("inbound.issuer"), i.issuer.as_deref())
        .map(String::from);
    if let Some(iss) = &issuer
        && i.discovery_url.is_none()
    {
        // Discovery is derived from the issuer, so it must be a usable URL.
        c.url(&k("inbound.issuer"), iss, idp);
    }
    let discovery_url = c.opt_url(&k("inbound.discovery_url"), i.discovery_url.as_deref(), idp);
    let jwks_uri = c.opt_url(&k("inbound.jwks_uri"), i.jwks_uri.as_deref(), idp);
    let audiences = i.audiences.clone().unwrap_or_default();
    if audiences.iter().all(|a| a.trim().is_empty()) {
        c.problem(
            &k("inbound.audiences"),
            "required (at least one accepted audience)",
        );
    }
    let mut algorithms = Vec::new();
    let names: Vec<String> = match &i.algorithms {
        Some(v) => v.clone(),
        None => DEFAULT_ALGORITHMS.iter().map(|s| s.to_string()).collect(),
    };
    for name in &names {
        match parse_algorithm(name) {
            Ok(a) => algorithms.push(a),
            Err(why) => c.problem(&k("inbound.algorithms"), format!("{name}: {why}")),
        }
    }
    if names.is_empty() {
        c.problem(&k("inbound.algorithms"), "must list at least one algorithm");
    }
    let leeway = c.duration(&k("inbound.leeway"), i.leeway.as_deref(), DEFAULT_LEEWAY);
    let max_token_bytes = i.max_token_bytes.unwrap_or(DEFAULT_MAX_TOKEN_BYTES);
    if max_token_bytes == 0 {
        c.problem(&k("inbound.max_token_bytes"), "must be greater than 0");
    }
    let introspection = i.introspection.as_ref().map(|ri| Introspection {
        endpoint: c.opt_url(
            &k("inbound.introspection.endpoint"),
            ri.endpoint.as_deref(),
            idp,
        ),
        client_id: c
            .required(
                &k("inbound.introspection.client_id"),
                ri.client_id.as_deref(),
            )
            .unwrap_or_default()
            .to_string(),
        client_secret_file: ri.client_secret_file.as_ref().map(PathBuf::from),
    });
    let stream_lifetime = match i.stream_lifetime.as_deref() {
        None | Some("token") => StreamLifetime::Token,
        Some("unlimited") => StreamLifetime::Unlimited,
        Some(_) => {
            c.problem(&k("inbound.stream_lifetime"), "must be token or unlimited");
            StreamLifetime::Token
        }
    };
    let public_paths = i.public_paths.clone().unwrap_or_default();
    for p in &public_paths {
        if !p.starts_with('/') {
            c.problem(&k("inbound.public_paths"), "each entry must start with /");
        } else if covers_every_path(p) {
            c.problem(
                &k("inbound.public_paths"),
                "an entry of slashes only makes every path public, turning authentication off; list narrow prefixes such as /health",
            );
        }
    }

    Some(Inbound {
        issuer: issuer?,
        discovery_url,
        jwks_uri,
        audiences,
        algorithms,
        leeway,
        required_scopes: i.required_scopes.clone().unwrap_or_default(),
        max_token_bytes,
        introspection,
        public_paths,
        stream_lifetime,
    })
}

/// The `exchange` section (of a profile: `prefix` names it in problems); its issuer defaults
/// to `inbound_issuer`.
fn exchange_section(
    c: &mut Checker,
    prefix: &str,
    e: &raw::RawExchange,
    inbound_issuer: &str,
    idp: Option<bool>,
) -> Exchange {
    let k = |key: &str| format!("{prefix}{key}");
    let client_id = c
        .required(&k("exchange.client_id"), e.client_id.as_deref())
        .unwrap_or_default()
        .to_string();
    let token_endpoint = c.opt_url(
        &k("exchange.token_endpoint"),
        e.token_endpoint.as_deref(),
        idp,
    );
    let ex_issuer = e
        .issuer
        .clone()
        .unwrap_or_else(|| inbound_issuer.to_owned());
    if token_endpoint.is_none() && e.issuer.is_some() {
        c.url(&k("exchange.issuer"), &ex_issuer, idp);
    }
    let client_auth = client_auth(c, prefix, &e.client_auth);
    let scope = e.scope.clone().filter(|s| !s.trim().is_empty());
    let extra_params = e.extra_params.clone().unwrap_or_default();
    for name in extra_params.keys() {
        if RESERVED_EXCHANGE_PARAMS.contains(&name.as_str()) {
            c.problem(
                &k("exchange.extra_params"),
                format!("{name} is set by the proxy and may not be overridden"),
            );
        }
    }
    let timeout = c.duration(
        &k("exchange.timeout"),
        e.timeout.as_deref(),
        DEFAULT_EXCHANGE_TIMEOUT,
    );
    if timeout.is_zero() {
        c.problem(&k("exchange.timeout"), "must be greater than 0");
    }
    let max_concurrent = e.max_concurrent.unwrap_or(DEFAULT_EXCHANGE_MAX_CONCURRENT);
    if max_concurrent == 0 {
        c.problem(&k("exchange.max_concurrent"), "must be at least 1");
    }
    let negative_ttl = c.duration(
        &k("exchange.negative_ttl"),
        e.negative_ttl.as_deref(),
        DEFAULT_NEGATIVE_TTL,
    );
    let verify_issued = match e.verify_issued.as_deref() {
        None | Some("auto") => VerifyIssued::Auto,
        Some("always") => VerifyIssued::Always,
        Some("never") => VerifyIssued::Never,
        Some(_) => {
            c.problem(
                &k("exchange.verify_issued"),
                "must be auto, always or never",
            );
            VerifyIssued::Auto
        }
    };
    for r in e.resource.iter().flatten() {
        // RFC 8707 §2: an absolute URI without a fragment.
        match Url::parse(r) {
            Ok(u) if u.fragment().is_none() => {}
            _ => c.problem(
                &k("exchange.resource"),
                "each entry must be an absolute URI without a fragment",
            ),
        }
    }
    let grant = match e.grant.as_deref() {
        None | Some("token_exchange") => Grant::TokenExchange,
        Some("jwt_bearer_obo") => Grant::JwtBearerObo,
        Some(_) => {
            c.problem(
                &k("exchange.grant"),
                "must be token_exchange or jwt_bearer_obo",
            );
            Grant::TokenExchange
        }
    };
    if grant == Grant::JwtBearerObo {
        if scope.is_none() {
            c.problem(
                &k("exchange.scope"),
                "required with grant jwt_bearer_obo (the scope of the backend's API, e.g. api://backend/.default)",
            );
        }
        for (key, set) in [
            ("exchange.audience", &e.audience),
            ("exchange.resource", &e.resource),
        ] {
            if set.as_ref().is_some_and(|v| !v.is_empty()) {
                c.problem(
                    &k(key),
                    "not sent with grant jwt_bearer_obo: exchange.scope names the backend's API",
                );
            }
        }
    }
    Exchange {
        grant,
        token_endpoint,
        issuer: ex_issuer,
        client_id,
        client_auth,
        audience: e.audience.clone().unwrap_or_default(),
        resource: e.resource.clone().unwrap_or_default(),
        scope,
        subject_token_type: e
            .subject_token_type
            .clone()
            .unwrap_or_else(|| ACCESS_TOKEN_TYPE.into()),
        requested_token_type: e
            .requested_token_type
            .clone()
            .unwrap_or_else(|| ACCESS_TOKEN_TYPE.into()),
        extra_params,
        timeout,
        max_concurrent,
        negative_ttl,
        verify_issued,
    }
}

/// The profiles: the named ones of `profiles`, or the one made of the top-level `inbound`
/// and `exchange` sections (named `""`). Problems name the profile's keys
/// (`profiles.corp.inbound.issuer`).
fn profiles(c: &mut Checker, raw: &RawConfig, mode: Mode, idp: Option<bool>) -> Vec<Profile> {
    let build =
        |c: &mut Checker, name: &str, prefix: &str, ri: &raw::RawInbound, re: &raw::RawExchange| {
            // Both sections are checked even when the first fails, so that every problem is
            // reported at once.
            let inbound = inbound_section(c, prefix, ri, idp);
            let issuer = inbound.as_ref().map_or("", |i| i.issuer.as_str());
            let exchange = match mode {
                Mode::Passthrough => None,
                Mode::Exchange => Some(exchange_section(c, prefix, re, issuer, idp)),
            };
            Some(Profile {
                name: name.to_owned(),
                inbound: inbound?,
                exchange,
            })
        };
    let Some(list) = &raw.profiles else {
        let (ri, re) = (
            raw.inbound.clone().unwrap_or_default(),
            raw.exchange.clone().unwrap_or_default(),
        );
        return build(c, "", "", &ri, &re).into_iter().collect();
    };
    if raw.inbound.is_some() {
        c.problem(
            "profiles",
            "cannot be combined with a top-level inbound section: put it in a profile",
        );
    }
    if raw.exchange.is_some() {
        c.problem(
            "profiles",
            "cannot be combined with a top-level exchange section: put it in a profile",
        );
    }
    if list.is_empty() {
        c.problem("profiles", "must list at least one profile");
    }
    let mut out: Vec<Profile> = Vec::new();
    for (n, rp) in list.iter().enumerate() {
        let name = rp.name.clone().unwrap_or_default();
        let valid = !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !valid {
            c.problem(
                &format!("profiles[{n}].name"),
                "required, and only of a-z, 0-9 and - (it is a metric label)",
            );
            continue;
        }
        if out.iter().any(|p| p.name == name) {
            c.problem(&format!("profiles.{name}.name"), "duplicate profile name");
            continue;
        }
        let prefix = format!("profiles.{name}.");
        let ri = rp.inbound.clone().unwrap_or_default();
        let re = rp.exchange.clone().unwrap_or_default();
        if let Some(profile) = build(c, &name, &prefix, &ri, &re) {
            if out
                .iter()
                .any(|p| p.inbound.issuer == profile.inbound.issuer)
            {
                c.problem(
                    &format!("{prefix}inbound.issuer"),
                    "another profile has this issuer: a token's iss must pick one profile",
                );
            }
            out.push(profile);
        }
    }
    if out
        .iter()
        .filter(|p| p.inbound.introspection.is_some())
        .count()
        > 1
    {
        c.problem(
            "profiles",
            "at most one profile may configure inbound.introspection (opaque tokens go to it)",
        );
    }
    out
}

/// Form parameters the proxy sets itself; `exchange.extra_params` may not name them
/// (RFC 8693 §2.1, RFC 6749 §2.3.1, RFC 7521 §4.2).
pub const RESERVED_EXCHANGE_PARAMS: &[&str] = &[
    "grant_type",
    "subject_token",
    "assertion",
    "requested_token_use",
    "subject_token_type",
    "actor_token",
    "actor_token_type",
    "requested_token_type",
    "audience",
    "resource",
    "scope",
    "client_id",
    "client_secret",
    "client_assertion",
    "client_assertion_type",
];

/// `trusted_proxies`: CIDRs, or single addresses.
fn trusted_proxies(c: &mut Checker, v: Option<&[String]>) -> Vec<ipnet::IpNet> {
    let mut out = Vec::new();
    for entry in v.unwrap_or_default() {
        let parsed = entry
            .parse::<ipnet::IpNet>()
            .or_else(|_| entry.parse::<std::net::IpAddr>().map(ipnet::IpNet::from));
        match parsed {
            Ok(net) => out.push(net.trunc()),
            Err(_) => c.problem(
                "trusted_proxies",
                format!("{entry}: not a CIDR (e.g. 10.0.0.0/8) or an IP address"),
            ),
        }
    }
    out
}

/// `cors`: exact origins (scheme, host and port only) or `["*"]`.
fn telemetry(c: &mut Checker, raw: Option<&raw::RawTelemetry>) -> Telemetry {
    let raw = raw.cloned().unwrap_or_default();
    let otlp_endpoint = c.opt_url(
        "telemetry.otlp_endpoint",
        raw.otlp_endpoint.as_deref(),
        None,
    );
    if let Some(u) = &otlp_endpoint
        && (u.query().is_some() || u.fragment().is_some())
    {
        c.problem(
            "telemetry.otlp_endpoint",
            "must not have a query or fragment",
        );
    }
    let service_name = match raw.service_name {
        Some(n) if n.trim().is_empty() => {
            c.problem("telemetry.service_name", "must not be empty");
            DEFAULT_SERVICE_NAME.to_owned()
        }
        Some(n) => n,
        None => DEFAULT_SERVICE_NAME.to_owned(),
    };
    let sample_ratio = match raw.sample_ratio {
        Some(r) if !(0.0..=1.0).contains(&r) => {
            c.problem("telemetry.sample_ratio", "must be between 0.0 and 1.0");
            DEFAULT_SAMPLE_RATIO
        }
        Some(r) => r,
        None => DEFAULT_SAMPLE_RATIO,
    };
    Telemetry {
        otlp_endpoint,
        service_name,
        sample_ratio,
    }
}

fn cors(c: &mut Checker, rc: &raw::RawCors) -> Cors {
    let allowed_origins = rc.allowed_origins.clone().unwrap_or_default();
    if allowed_origins.is_empty() {
        c.problem(
            "cors.allowed_origins",
            "required with cors (exact origins, or [\"*\"])",
        );
    }
    let any = allowed_origins.iter().any(|o| o == "*");
    if any && allowed_origins.len() > 1 {
        c.problem("cors.allowed_origins", "\"*\" must be the only entry");
    }
    for o in allowed_origins.iter().filter(|o| *o != "*") {
        let exact = Url::parse(o).ok().filter(|u| {
            matches!(u.scheme(), "http" | "https")
                && u.host().is_some()
                && u.origin().ascii_serialization() == *o
        });
        if exact.is_none() {
            c.problem(
                "cors.allowed_origins",
                format!("{o}: not an origin (scheme://host[:port], no path or trailing slash)"),
            );
        }
        if http::HeaderValue::from_str(o).is_err() {
            c.problem("cors.allowed_origins", format!("{o}: not a header value"));
        }
    }
    Cors {
        allowed_origins,
        max_age: c.duration("cors.max_age", rc.max_age.as_deref(), DEFAULT_CORS_MAX_AGE),
    }
}

fn parse_algorithm(name: &str) -> Result<jsonwebtoken::Algorithm, &'static str> {
    use jsonwebtoken::Algorithm::*;
    Ok(match name {
        "RS256" => RS256,
        "RS384" => RS384,
        "RS512" => RS512,
        "PS256" => PS256,
        "PS384" => PS384,
        "PS512" => PS512,
        "ES256" => ES256,
        "ES384" => ES384,
        "EdDSA" => EdDSA,
        "none" | "HS256" | "HS384" | "HS512" => {
            return Err("not allowed (none and HMAC cannot verify a third party's token)");
        }
        _ => return Err("unknown algorithm"),
    })
}

fn client_auth(c: &mut Checker, prefix: &str, a: &raw::RawClientAuth) -> ClientAuth {
    let file = |c: &mut Checker, key: &str, v: &Option<String>| -> PathBuf {
        PathBuf::from(
            c.required(&format!("{prefix}{key}"), v.as_deref())
                .unwrap_or_default(),
        )
    };
    let method = a.method.as_deref().unwrap_or("client_secret_basic");
    if a.certificate_file.is_some() && method != "private_key_jwt" {
        c.problem(
            &format!("{prefix}exchange.client_auth.certificate_file"),
            "only used with method private_key_jwt",
        );
    }
    match method {
        "client_secret_basic" => ClientAuth::ClientSecretBasic {
            secret_file: file(c, "exchange.client_auth.secret_file", &a.secret_file),
        },
        "client_secret_post" => ClientAuth::ClientSecretPost {
            secret_file: file(c, "exchange.client_auth.secret_file", &a.secret_file),
        },
        "private_key_jwt" => ClientAuth::PrivateKeyJwt {
            private_key_file: file(
                c,
                "exchange.client_auth.private_key_file",
                &a.private_key_file,
            ),
            key_id: a.key_id.clone(),
            certificate_file: a.certificate_file.as_ref().map(PathBuf::from),
        },
        "client_assertion_file" => ClientAuth::ClientAssertionFile {
            assertion_file: file(c, "exchange.client_auth.assertion_file", &a.assertion_file),
        },
        "none" => ClientAuth::None,
        _ => {
            c.problem(
                &format!("{prefix}exchange.client_auth.method"),
                "must be client_secret_basic, client_secret_post, private_key_jwt, client_assertion_file or none",
            );
            ClientAuth::None
        }
    }
}

#[cfg(test)]
mod tests;
