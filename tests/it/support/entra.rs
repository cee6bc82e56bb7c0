//! An in-process Microsoft Entra ID tenant on 127.0.0.1:0, speaking the v2.0 endpoints as
//! Microsoft documents them ("Microsoft identity platform and OAuth 2.0 On-Behalf-Of flow",
//! "certificate credentials", "workload identity federation"):
//!
//! - `GET /{tenant}/v2.0/.well-known/openid-configuration`: issuer
//!   `http://127.0.0.1:PORT/{tenant}/v2.0`, `token_endpoint` `/{tenant}/oauth2/v2.0/token`,
//!   `jwks_uri` `/{tenant}/discovery/v2.0/keys`; like Entra's, it lists no
//!   `grant_types_supported`.
//! - `POST /{tenant}/oauth2/v2.0/token` with `grant_type=urn:ietf:params:oauth:grant-type:jwt-bearer`:
//!   the client authenticated (a secret in the form or in HTTP Basic; a certificate assertion
//!   whose `x5t#S256` names the registered certificate; or a federated assertion from a trusted
//!   issuer with the audience `api://AzureADTokenExchange`), then `requested_token_use`,
//!   `scope` and the `assertion` checked (signed by this tenant, issued to the client's own
//!   application id, unexpired), then the programmed [`Answer`].
//!
//! Errors carry what Entra's do: `error`, `error_description` (`AADSTSnnnnn: …` with trace and
//! correlation ids), `error_codes`, `timestamp`, `trace_id`, `correlation_id`, `error_uri`, and
//! `suberror` or `claims` where Microsoft documents them.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Value, json};
use tokio::net::TcpListener;

use super::issuer::{Key, now, rand_u64};
use super::token_endpoint::{JWT_BEARER, PROBE_SUBJECT};

/// The OBO grant (RFC 7523 §2.1, as Entra uses it).
pub const OBO_GRANT: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
/// The audience Entra requires of a federated credential's assertion.
pub const FEDERATION_AUDIENCE: &str = "api://AzureADTokenExchange";
/// The tenant id of the test tenant.
pub const TENANT: &str = "9188040d-6c67-4c5b-b112-36a304b66dad";
/// The application (client) id of the MCP API's registration, which the proxy uses.
pub const CLIENT_ID: &str = "6731de76-14a6-49ae-97bc-6eba6914391e";
/// The claims request of Microsoft's documented Conditional Access example (AADSTS50079).
pub const CA_CLAIMS: &str = r#"{"access_token":{"polids":{"essential":true,"values":["9ab03e19-ed42-4168-b6b7-7001fb3e933a"]}}}"#;

/// How the proxy's application registration authenticates.
#[derive(Clone)]
pub enum Credential {
    /// A client secret, accepted in the form (`client_secret`) or in HTTP Basic.
    Secret(String),
    /// A certificate (its DER): the assertion's header names it by `x5t#S256` (or `x5t`),
    /// its signature verifies with the certificate's public `key` and `alg`, `aud` is the
    /// token endpoint.
    Certificate {
        der: Vec<u8>,
        key: DecodingKey,
        alg: Algorithm,
    },
    /// A federated identity credential: the assertion is a token of `issuer` (signed with
    /// `key`) for `subject`, with the audience `api://AzureADTokenExchange`.
    Federated {
        issuer: String,
        subject: String,
        key: Key,
    },
}

/// What the tenant answers to an authenticated, well-formed OBO request.
#[derive(Clone, Debug)]
pub enum Answer {
    /// 200 with a JWT for the scope's resource, living `expires_in` seconds.
    Issue { expires_in: u64 },
    /// 400 `interaction_required` AADSTS50079 with the [`CA_CLAIMS`] claims challenge.
    ClaimsChallenge,
    /// 400 `invalid_grant` AADSTS65001 with `suberror: consent_required`.
    ConsentRequired,
    /// 400 `interaction_required` AADSTS50158 without `claims`.
    InteractionRequired,
    /// `status` with `error` and the AADSTS `code`, and a `Retry-After` if given.
    Error {
        status: u16,
        error: &'static str,
        code: u32,
        retry_after: Option<&'static str>,
    },
}

/// One token request as the tenant saw it.
#[derive(Clone, Debug)]
pub struct Seen {
    pub form: Vec<(String, String)>,
    pub authorization: Option<String>,
    /// The access token issued in answer, if any.
    pub issued: Option<String>,
    /// The AADSTS code of the error answered, if any.
    pub error_code: Option<u32>,
}

impl Seen {
    /// The first value of form parameter `name`.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.form
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

struct State {
    base: String,
    key: Key,
    credential: Mutex<Credential>,
    answer: Mutex<Answer>,
    calls: AtomicUsize,
    probes: AtomicUsize,
    issued: AtomicUsize,
    seen: Mutex<Vec<Seen>>,
}

/// A running tenant.
#[derive(Clone)]
pub struct Entra {
    pub addr: SocketAddr,
    state: Arc<State>,
}

impl Entra {
    /// Starts the tenant with a fresh RSA signing key; the proxy's registration
    /// ([`CLIENT_ID`]) authenticates with `credential`; OBO requests get
    /// [`Answer::Issue`] of 3599 s (Entra's usual lifetime less a second).
    pub async fn start(credential: Credential) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind entra");
        let addr = listener.local_addr().expect("addr");
        let state = Arc::new(State {
            base: format!("http://{addr}"),
            key: Key::rsa(&format!("{:x}", rand_u64())),
            credential: Mutex::new(credential),
            answer: Mutex::new(Answer::Issue { expires_in: 3599 }),
            calls: AtomicUsize::new(0),
            probes: AtomicUsize::new(0),
            issued: AtomicUsize::new(0),
            seen: Mutex::default(),
        });
        let tenant = Self { addr, state };
        let t = tenant.clone();
        super::serve(listener, move |req| {
            let t = t.clone();
            async move { t.handle(req).await }
        });
        tenant
    }

    /// `http://127.0.0.1:PORT/{tenant}/v2.0`, the issuer of v2.0 access tokens.
    pub fn issuer(&self) -> String {
        format!("{}/{TENANT}/v2.0", self.state.base)
    }

    /// The issuer of v1.0 access tokens (what OBO issues for most resource APIs).
    pub fn v1_issuer(&self) -> String {
        format!("{}/{TENANT}/", self.state.base)
    }

    /// `http://127.0.0.1:PORT/{tenant}/oauth2/v2.0/token`
    pub fn token_endpoint(&self) -> String {
        format!("{}/{TENANT}/oauth2/v2.0/token", self.state.base)
    }

    /// OBO requests so far (credentials probes not included).
    pub fn calls(&self) -> usize {
        self.state.calls.load(Ordering::SeqCst)
    }

    /// The proxy's credentials probes so far.
    pub fn probes(&self) -> usize {
        self.state.probes.load(Ordering::SeqCst)
    }

    /// Every OBO request so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().expect("lock").clone()
    }

    /// The last OBO request.
    pub fn last(&self) -> Seen {
        self.seen().pop().expect("an OBO request was made")
    }

    /// From now on, answer `answer`.
    pub fn answer(&self, answer: Answer) {
        *self.state.answer.lock().expect("lock") = answer;
    }

    /// A v2.0 access token a client obtained for the MCP API: `aud` = [`CLIENT_ID`], `scp`
    /// = `scp`, issued by this tenant for user `oid`, valid ten minutes.
    pub fn user_token(&self, oid: &str, scp: &str) -> String {
        let mut claims = self.user_claims(oid, scp);
        claims["jti"] = format!("{:x}", rand_u64()).into();
        self.sign(&claims)
    }

    /// The claims of [`Entra::user_token`], to change before [`Entra::sign`].
    pub fn user_claims(&self, oid: &str, scp: &str) -> Value {
        let now = now();
        json!({
            "aud": CLIENT_ID, "iss": self.issuer(), "iat": now, "nbf": now, "exp": now + 600,
            "azp": "04b07795-8ddb-461a-bbee-02f9e1bf7b46", "azpacr": "0",
            "name": "Alice", "oid": oid, "preferred_username": "alice@contoso.example",
            "scp": scp, "sub": format!("pairwise-{oid}"), "tid": TENANT, "ver": "2.0",
            "uti": format!("{:x}", rand_u64()),
        })
    }

    /// `claims` signed with the tenant's key (RS256, `kid` and `typ: JWT` as Entra's).
    pub fn sign(&self, claims: &Value) -> String {
        let key = &self.state.key;
        key.sign(
            &json!({"alg": "RS256", "kid": key.kid, "typ": "JWT"}),
            claims,
        )
    }

    async fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let path = req.uri().path().to_owned();
        let tenant = format!("/{TENANT}");
        let Some(rest) = path.strip_prefix(&tenant) else {
            return json_response(StatusCode::NOT_FOUND, &json!({"error": "invalid_tenant"}));
        };
        match (req.method().as_str(), rest) {
            ("GET", "/v2.0/.well-known/openid-configuration") => json_response(
                StatusCode::OK,
                &json!({
                    "issuer": self.issuer(),
                    "token_endpoint": self.token_endpoint(),
                    "jwks_uri": format!("{}/{TENANT}/discovery/v2.0/keys", self.state.base),
                    "authorization_endpoint":
                        format!("{}/{TENANT}/oauth2/v2.0/authorize", self.state.base),
                    "response_types_supported": ["code", "id_token", "code id_token", "id_token token"],
                    "subject_types_supported": ["pairwise"],
                    "id_token_signing_alg_values_supported": ["RS256"],
                    "scopes_supported": ["openid", "profile", "email", "offline_access"],
                    "token_endpoint_auth_methods_supported":
                        ["client_secret_post", "private_key_jwt", "client_secret_basic"],
                    "tenant_region_scope": "EU",
                }),
            ),
            ("GET", "/discovery/v2.0/keys") => {
                let mut jwk = self.state.key.jwk();
                jwk["x5t"] = jwk["kid"].clone();
                jwk["issuer"] = self.issuer().into();
                json_response(StatusCode::OK, &json!({"keys": [jwk]}))
            }
            ("POST", "/oauth2/v2.0/token") => self.token(req).await,
            _ => json_response(StatusCode::NOT_FOUND, &json!({"error": "not_found"})),
        }
    }

    async fn token(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let request = super::read_form(req).await;
        let form_content = request.form_content;
        let mut seen = Seen {
            form: request.form,
            authorization: request.authorization,
            issued: None,
            error_code: None,
        };
        let probe = seen.param("assertion") == Some(PROBE_SUBJECT);
        if probe {
            self.state.probes.fetch_add(1, Ordering::SeqCst);
        } else {
            self.state.calls.fetch_add(1, Ordering::SeqCst);
        }
        let (response, code) = self.answer_for(&mut seen, form_content);
        seen.error_code = code;
        if !probe {
            self.state.seen.lock().expect("lock").push(seen);
        }
        response
    }

    /// The answer to one token request, and its AADSTS code if it is an error.
    fn answer_for(
        &self,
        seen: &mut Seen,
        form_content: bool,
    ) -> (Response<Full<Bytes>>, Option<u32>) {
        let error = |status: u16, error: &str, code: u32, text: &str| {
            (self.error(status, error, code, text, None), Some(code))
        };
        if !form_content {
            return error(
                400,
                "invalid_request",
                900144,
                "The request body must contain the following parameter: 'grant_type'.",
            );
        }
        if seen.param("grant_type") != Some(OBO_GRANT) {
            return error(
                400,
                "unsupported_grant_type",
                70003,
                "The app requested an unsupported grant type.",
            );
        }
        if let Err(code) = self.authenticate(seen) {
            return error(
                401,
                "invalid_client",
                code,
                match code {
                    7000215 => "Invalid client secret provided.",
                    700027 => "Client assertion failed signature validation.",
                    _ => "No matching federated identity record found for presented assertion.",
                },
            );
        }
        for name in ["requested_token_use", "scope", "assertion"] {
            if seen.param(name).is_none_or(str::is_empty) {
                return error(
                    400,
                    "invalid_request",
                    900144,
                    &format!("The request body must contain the following parameter: '{name}'."),
                );
            }
        }
        if seen.param("requested_token_use") != Some("on_behalf_of") {
            return error(
                400,
                "invalid_request",
                50011,
                "The value of requested_token_use is invalid.",
            );
        }
        let assertion = seen.param("assertion").unwrap_or_default().to_owned();
        let user = match self.verify_user_assertion(&assertion) {
            Ok(user) => user,
            Err((code, text)) => return error(400, "invalid_grant", code, text),
        };
        let answer = self.state.answer.lock().expect("lock").clone();
        match answer {
            Answer::Issue { expires_in } => {
                let scope = seen.param("scope").unwrap_or_default().to_owned();
                let token = self.issue(&user, &scope, expires_in);
                seen.issued = Some(token.clone());
                let mut doc = json!({
                    "token_type": "Bearer",
                    "scope": scope.split(' ').filter(|s| *s != "offline_access").collect::<Vec<_>>().join(" "),
                    "expires_in": expires_in,
                    "ext_expires_in": expires_in,
                    "access_token": token,
                });
                if scope.split(' ').any(|s| s == "offline_access") {
                    doc["refresh_token"] = format!("rt-{:x}", rand_u64()).into();
                }
                (json_response(StatusCode::OK, &doc), None)
            }
            Answer::ClaimsChallenge => (
                self.error(
                    400,
                    "interaction_required",
                    50079,
                    "Due to a configuration change made by your administrator, or because you moved to a new location, you must enroll in multi-factor authentication to access 'bf8d80f9-9098-4972-b203-500f535113b1'.",
                    Some(("claims", CA_CLAIMS)),
                ),
                Some(50079),
            ),
            Answer::ConsentRequired => (
                self.error(
                    400,
                    "invalid_grant",
                    65001,
                    &format!("The user or administrator has not consented to use the application with ID '{CLIENT_ID}' named 'mcp-api'. Send an interactive authorization request for this user and resource."),
                    Some(("suberror", "consent_required")),
                ),
                Some(65001),
            ),
            Answer::InteractionRequired => error(
                400,
                "interaction_required",
                50158,
                "External security challenge not satisfied. User will be redirected to another page or authentication provider to satisfy additional authentication challenges.",
            ),
            Answer::Error {
                status,
                error: e,
                code,
                retry_after,
            } => {
                let mut resp = self.error(status, e, code, "The service is temporarily unavailable.", None);
                if let Some(r) = retry_after {
                    resp.headers_mut()
                        .insert(http::header::RETRY_AFTER, r.parse().expect("header"));
                }
                (resp, Some(code))
            }
        }
    }

    /// Authenticates the proxy's registration; `Err` carries the AADSTS code.
    fn authenticate(&self, seen: &Seen) -> Result<(), u32> {
        let credential = self.state.credential.lock().expect("lock").clone();
        match credential {
            Credential::Secret(secret) => {
                let in_form = (seen.param("client_id"), seen.param("client_secret"));
                let basic = seen
                    .authorization
                    .as_deref()
                    .and_then(|h| h.strip_prefix("Basic "))
                    .and_then(|b| STANDARD.decode(b).ok())
                    .and_then(|b| String::from_utf8(b).ok());
                let ok = match (in_form, basic) {
                    ((Some(id), Some(s)), None) => id == CLIENT_ID && s == secret,
                    ((id, None), Some(pair)) => {
                        let (bid, bs) = pair.split_once(':').unwrap_or_default();
                        bid == CLIENT_ID
                            && form_decode(bs) == secret
                            && id.is_none_or(|id| id == CLIENT_ID)
                    }
                    _ => false,
                };
                ok.then_some(()).ok_or(7000215)
            }
            Credential::Certificate { der, key, alg } => {
                let assertion = self.client_assertion(seen).ok_or(700027u32)?;
                let header = jsonwebtoken::decode_header(assertion).map_err(|_| 700027u32)?;
                let s256 = URL_SAFE_NO_PAD
                    .encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &der));
                let sha1 = URL_SAFE_NO_PAD.encode(aws_lc_rs::digest::digest(
                    &aws_lc_rs::digest::SHA1_FOR_LEGACY_USE_ONLY,
                    &der,
                ));
                if header.x5t_s256.as_deref() != Some(s256.as_str())
                    && header.x5t.as_deref() != Some(sha1.as_str())
                {
                    return Err(700027);
                }
                let claims = verify_with(assertion, &key, alg, CLIENT_ID, &self.token_endpoint())
                    .ok_or(700027u32)?;
                (claims["sub"] == CLIENT_ID).then_some(()).ok_or(700027)
            }
            Credential::Federated {
                issuer,
                subject,
                key,
            } => {
                if seen.param("client_id") != Some(CLIENT_ID) {
                    return Err(700016);
                }
                let assertion = self.client_assertion(seen).ok_or(70021u32)?;
                let claims =
                    verify(assertion, &key, &issuer, FEDERATION_AUDIENCE).ok_or(70021u32)?;
                (claims["sub"] == subject.as_str())
                    .then_some(())
                    .ok_or(70021)
            }
        }
    }

    /// The `client_assertion` of a request that uses the JWT bearer client assertion type and
    /// no other method.
    fn client_assertion<'s>(&self, seen: &'s Seen) -> Option<&'s str> {
        if seen.authorization.is_some()
            || seen.param("client_secret").is_some()
            || seen.param("client_assertion_type") != Some(JWT_BEARER)
        {
            return None;
        }
        seen.param("client_assertion")
    }

    /// The OBO `assertion`: a token of this tenant for the calling application, unexpired.
    fn verify_user_assertion(&self, assertion: &str) -> Result<Value, (u32, &'static str)> {
        if jsonwebtoken::decode_header(assertion).is_err() {
            return Err((50027, "JWT token is invalid or malformed."));
        }
        let audiences = [CLIENT_ID.to_owned(), format!("api://{CLIENT_ID}")];
        let jwk: Jwk = serde_json::from_value(self.state.key.jwk()).expect("jwk");
        let key = DecodingKey::from_jwk(&jwk).expect("key");
        let mut v = Validation::new(Algorithm::RS256);
        v.set_issuer(&[self.issuer()]);
        v.set_audience(&audiences);
        v.leeway = 0;
        match jsonwebtoken::decode::<Value>(assertion, &key, &v) {
            Ok(data) => Ok(data.claims),
            Err(e) => Err(match e.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => {
                    (500133, "Assertion is not within its valid time range.")
                }
                jsonwebtoken::errors::ErrorKind::InvalidAudience => (
                    50013,
                    "Assertion failed signature validation. [Reason - The provided signature value did not match the expected signature value.]",
                ),
                _ => (50013, "Assertion failed signature validation."),
            }),
        }
    }

    /// The access token OBO issues for `scope`'s resource: a v1.0 token (`iss`
    /// `…/{tenant}/`), as Entra issues for resources that accept v1.0 tokens.
    fn issue(&self, user: &Value, scope: &str, expires_in: u64) -> String {
        let n = self.state.issued.fetch_add(1, Ordering::SeqCst);
        let resource = scope
            .split(' ')
            .find(|s| *s != "offline_access")
            .and_then(|s| s.strip_suffix("/.default"))
            .unwrap_or(scope);
        let now = now();
        self.sign(&json!({
            "aud": resource, "iss": self.v1_issuer(), "iat": now, "nbf": now,
            "exp": now + expires_in as i64, "appid": CLIENT_ID, "oid": user["oid"],
            "sub": user["sub"], "tid": TENANT, "ver": "1.0", "scp": "user_impersonation",
            "uti": format!("obo-{n}"),
        }))
    }

    /// An Entra error document.
    fn error(
        &self,
        status: u16,
        error: &str,
        code: u32,
        text: &str,
        extra: Option<(&str, &str)>,
    ) -> Response<Full<Bytes>> {
        let trace_id = uuid_like();
        let correlation_id = uuid_like();
        // "2017-05-01 22:43:20Z", as in Microsoft's examples.
        let timestamp = humantime::format_rfc3339_seconds(std::time::SystemTime::now())
            .to_string()
            .replace('T', " ");
        let mut doc = json!({
            "error": error,
            "error_description": format!(
                "AADSTS{code}: {text}\r\nTrace ID: {trace_id}\r\nCorrelation ID: {correlation_id}\r\nTimestamp: {timestamp}"
            ),
            "error_codes": [code],
            "timestamp": timestamp,
            "trace_id": trace_id,
            "correlation_id": correlation_id,
            "error_uri": format!("{}/error?code={code}", self.state.base),
        });
        if let Some((name, value)) = extra {
            doc[name] = value.into();
        }
        json_response(StatusCode::from_u16(status).expect("status"), &doc)
    }
}

/// Verifies `token` with `key`: signature, `iss`, `aud`, unexpired.
fn verify(token: &str, key: &Key, iss: &str, aud: &str) -> Option<Value> {
    let jwk: Jwk = serde_json::from_value(key.jwk()).ok()?;
    let decoding = DecodingKey::from_jwk(&jwk).ok()?;
    verify_with(token, &decoding, key.alg, iss, aud)
}

/// Verifies `token` with `decoding` and `alg`: signature, `iss`, `aud`, unexpired.
fn verify_with(
    token: &str,
    decoding: &DecodingKey,
    alg: Algorithm,
    iss: &str,
    aud: &str,
) -> Option<Value> {
    let mut v = Validation::new(alg);
    v.set_issuer(&[iss]);
    v.set_audience(&[aud]);
    v.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
    v.leeway = 5;
    jsonwebtoken::decode::<Value>(token, decoding, &v)
        .ok()
        .map(|d| d.claims)
}

fn uuid_like() -> String {
    let (a, b) = (rand_u64(), rand_u64());
    format!(
        "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xffff,
        b >> 48,
        b & 0xffff_ffff_ffff
    )
}

fn form_decode(s: &str) -> String {
    url::form_urlencoded::parse(format!("v={s}").as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}

fn json_response(status: StatusCode, doc: &Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(
            http::header::CONTENT_TYPE,
            "application/json; charset=utf-8",
        )
        .header(http::header::CACHE_CONTROL, "no-store, no-cache")
        .body(Full::new(Bytes::from(doc.to_string())))
        .expect("response")
}
