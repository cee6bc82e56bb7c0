//! An in-process OAuth token endpoint for RFC 8693 token exchange, on 127.0.0.1:0.
//!
//! It counts calls with an atomic, records every request (form parameters and
//! `Authorization`), authenticates the client the way a real authorization server does for
//! each method, and answers as programmed:
//!
//! - client_secret_basic: `Authorization: Basic`, id and secret each form-urlencoded before
//!   Base64 (RFC 6749 §2.3.1) and decoded here;
//! - client_secret_post: `client_id` and `client_secret` in the form;
//! - private_key_jwt: the assertion's signature verified against the public key (jsonwebtoken),
//!   `iss` = `sub` = client id, `aud` = this endpoint's URL, `exp` in the future, a `jti` never
//!   seen before;
//! - client_assertion_file: the assertion compared to the file's content *now*, so a test can
//!   rotate the file and see the proxy follow;
//! - none: only `client_id`.
//!
//! A failed client authentication answers 401 `invalid_client`, like a real server.
//! It also serves `/.well-known/openid-configuration` naming itself as issuer, for discovery.

#![allow(dead_code)]

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use tokio::net::TcpListener;

/// RFC 8693 §2.1.
pub const GRANT_TYPE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
/// RFC 8693 §3.
pub const ACCESS_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:access_token";
/// RFC 7523 §2.2.
pub const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
/// The subject token of the proxy's credentials probe.
pub use token_exchange_proxy::exchange::PROBE_SUBJECT;

/// How the endpoint expects the client to authenticate.
#[derive(Clone)]
pub enum ClientAuth {
    Basic {
        id: String,
        secret: String,
    },
    Post {
        id: String,
        secret: String,
    },
    PrivateKeyJwt {
        id: String,
        key: DecodingKey,
        alg: Algorithm,
    },
    AssertionFile {
        id: String,
        path: PathBuf,
    },
    None {
        id: String,
    },
}

impl ClientAuth {
    /// The client id this method authenticates.
    pub fn id(&self) -> &str {
        match self {
            ClientAuth::Basic { id, .. }
            | ClientAuth::Post { id, .. }
            | ClientAuth::PrivateKeyJwt { id, .. }
            | ClientAuth::AssertionFile { id, .. }
            | ClientAuth::None { id } => id,
        }
    }
}

/// What the endpoint answers to an authenticated, well-formed request.
#[derive(Clone, Debug)]
pub enum Answer {
    /// 200 with a fresh token `xt-<n>` (n counts issued tokens) and these fields.
    Issue {
        expires_in: Option<u64>,
        token_type: &'static str,
        issued_token_type: Option<&'static str>,
    },
    /// 200 with a fixed access token (e.g. a JWT with an `exp`).
    IssueToken {
        access_token: String,
        expires_in: Option<u64>,
    },
    /// 200 with a fresh JWT living `expires_in` seconds, as an IdP issues for a delegation:
    /// `sub` of the subject token, `aud` the requested `audience` (RFC 8693 §2.1), `act`
    /// naming the authenticated client (§4.1). Signed as [`TokenEndpoint::sign_as`] says,
    /// else unsigned (RFC 7515 Appendix A.5) with this endpoint as `iss`.
    IssueJwt { expires_in: u64 },
    /// An error status with an optional RFC 6749 §5.2 `error` and `Retry-After`.
    Error {
        status: u16,
        error: Option<&'static str>,
        retry_after: Option<String>,
    },
    /// 200 with a body that is not a token response.
    Garbage,
}

impl Answer {
    /// A normal Bearer access token living `expires_in` seconds.
    pub fn issue(expires_in: u64) -> Self {
        Answer::Issue {
            expires_in: Some(expires_in),
            token_type: "Bearer",
            issued_token_type: Some(ACCESS_TOKEN_TYPE),
        }
    }

    /// An error answer.
    pub fn error(status: u16, error: Option<&'static str>) -> Self {
        Answer::Error {
            status,
            error,
            retry_after: None,
        }
    }
}

/// One request as the endpoint saw it.
#[derive(Clone, Debug)]
pub struct Seen {
    pub form: Vec<(String, String)>,
    pub authorization: Option<String>,
    /// The W3C `traceparent` the request carried.
    pub traceparent: Option<String>,
    /// The access token issued in answer, if any.
    pub issued: Option<String>,
    /// Whether the client authenticated successfully.
    pub client_ok: bool,
}

impl Seen {
    /// The first value of form parameter `name`.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.form
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Every value of form parameter `name`, in order.
    pub fn params(&self, name: &str) -> Vec<&str> {
        self.form
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

struct State {
    calls: AtomicUsize,
    probes: AtomicUsize,
    discovery_calls: AtomicUsize,
    discovery_down: AtomicBool,
    issued: AtomicUsize,
    answer: Mutex<Answer>,
    delay: Mutex<Duration>,
    auth: Mutex<ClientAuth>,
    seen: Mutex<Vec<Seen>>,
    jtis: Mutex<HashSet<String>>,
    /// Who issues delegation JWTs and the key they are signed with.
    signer: Mutex<Option<(String, super::issuer::Key)>>,
}

/// A running token endpoint.
#[derive(Clone)]
pub struct TokenEndpoint {
    pub addr: SocketAddr,
    state: Arc<State>,
}

impl TokenEndpoint {
    /// Starts the endpoint; it answers [`Answer::issue`]`(300)` to client `auth`.
    pub async fn start(auth: ClientAuth) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind token endpoint");
        let addr = listener.local_addr().expect("addr");
        let state = Arc::new(State {
            calls: AtomicUsize::new(0),
            probes: AtomicUsize::new(0),
            discovery_calls: AtomicUsize::new(0),
            discovery_down: AtomicBool::new(false),
            issued: AtomicUsize::new(0),
            answer: Mutex::new(Answer::issue(300)),
            delay: Mutex::new(Duration::ZERO),
            auth: Mutex::new(auth),
            seen: Mutex::default(),
            jtis: Mutex::default(),
            signer: Mutex::default(),
        });
        let endpoint = Self { addr, state };
        let e = endpoint.clone();
        super::serve(listener, move |req| {
            let e = e.clone();
            async move { e.handle(req).await }
        });
        endpoint
    }

    /// Delegation JWTs ([`Answer::IssueJwt`]) name `issuer` as `iss` and are signed with
    /// `key`, as by an IdP that signs every token it issues with the key it publishes.
    pub fn sign_as(&self, issuer: &str, key: &super::issuer::Key) {
        *self.state.signer.lock().expect("lock") = Some((issuer.to_owned(), key.clone()));
    }

    /// `http://127.0.0.1:PORT` (also the issuer in its discovery document).
    pub fn issuer(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `http://127.0.0.1:PORT/token`
    pub fn url(&self) -> String {
        format!("http://{}/token", self.addr)
    }

    /// Token requests received so far (authenticated or not).
    pub fn calls(&self) -> usize {
        self.state.calls.load(Ordering::SeqCst)
    }

    /// Credentials probes so far (token requests for [`PROBE_SUBJECT`], not in `calls`).
    pub fn probes(&self) -> usize {
        self.state.probes.load(Ordering::SeqCst)
    }

    /// Discovery requests so far.
    pub fn discovery_calls(&self) -> usize {
        self.state.discovery_calls.load(Ordering::SeqCst)
    }

    /// Whether discovery answers (else 503).
    pub fn discovery_available(&self, up: bool) {
        self.state.discovery_down.store(!up, Ordering::SeqCst);
    }

    /// Every token request so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().expect("lock").clone()
    }

    /// The last token request.
    pub fn last(&self) -> Seen {
        self.seen().pop().expect("a token request was made")
    }

    /// From now on, answer `answer`.
    pub fn answer(&self, answer: Answer) {
        *self.state.answer.lock().expect("lock") = answer;
    }

    /// From now on, wait `delay` before answering.
    pub fn delay(&self, delay: Duration) {
        *self.state.delay.lock().expect("lock") = delay;
    }

    /// From now on, expect `auth`.
    pub fn expect_auth(&self, auth: ClientAuth) {
        *self.state.auth.lock().expect("lock") = auth;
    }

    async fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        match (req.method().as_str(), req.uri().path()) {
            ("GET", "/.well-known/openid-configuration") => {
                self.state.discovery_calls.fetch_add(1, Ordering::SeqCst);
                if self.state.discovery_down.load(Ordering::SeqCst) {
                    return json(StatusCode::SERVICE_UNAVAILABLE, serde_json::json!({}));
                }
                let doc = serde_json::json!({
                    "issuer": self.issuer(),
                    "token_endpoint": self.url(),
                    "jwks_uri": format!("{}/jwks", self.issuer()),
                });
                json(StatusCode::OK, doc)
            }
            ("POST", "/token") => self.token(req).await,
            _ => json(
                StatusCode::NOT_FOUND,
                serde_json::json!({"error": "not_found"}),
            ),
        }
    }

    async fn token(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let request = super::read_form(req).await;
        let content_type_ok = request.form_content;
        let mut seen = Seen {
            form: request.form,
            authorization: request.authorization,
            traceparent: request.traceparent,
            issued: None,
            client_ok: false,
        };
        // The proxy's credentials probe: answered like any IdP answers a bad subject token,
        // and counted apart, so that `calls` counts exchanges.
        if seen.param("subject_token") == Some(PROBE_SUBJECT) {
            self.state.probes.fetch_add(1, Ordering::SeqCst);
            return if self.authenticate(&seen) {
                json(
                    StatusCode::BAD_REQUEST,
                    serde_json::json!({"error": "invalid_grant"}),
                )
            } else {
                json(
                    StatusCode::UNAUTHORIZED,
                    serde_json::json!({"error": "invalid_client"}),
                )
            };
        }
        self.state.calls.fetch_add(1, Ordering::SeqCst);
        let delay = *self.state.delay.lock().expect("lock");
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }

        seen.client_ok = self.authenticate(&seen);
        let response = if !seen.client_ok {
            json(
                StatusCode::UNAUTHORIZED,
                serde_json::json!({"error": "invalid_client", "error_description": "client authentication failed"}),
            )
        } else if !content_type_ok
            || seen.param("grant_type") != Some(GRANT_TYPE)
            || seen.param("subject_token").is_none_or(str::is_empty)
            || seen.param("subject_token_type").is_none()
        {
            json(
                StatusCode::BAD_REQUEST,
                serde_json::json!({"error": "invalid_request"}),
            )
        } else {
            let answer = self.state.answer.lock().expect("lock").clone();
            match answer {
                Answer::Issue {
                    expires_in,
                    token_type,
                    issued_token_type,
                } => {
                    let n = self.state.issued.fetch_add(1, Ordering::SeqCst);
                    let token = format!("xt-{n}");
                    seen.issued = Some(token.clone());
                    let mut doc =
                        serde_json::json!({"access_token": token, "token_type": token_type});
                    if let Some(e) = expires_in {
                        doc["expires_in"] = e.into();
                    }
                    if let Some(t) = issued_token_type {
                        doc["issued_token_type"] = t.into();
                    }
                    json(StatusCode::OK, doc)
                }
                Answer::IssueToken {
                    access_token,
                    expires_in,
                } => {
                    seen.issued = Some(access_token.clone());
                    let mut doc = serde_json::json!({
                        "access_token": access_token,
                        "token_type": "Bearer",
                        "issued_token_type": ACCESS_TOKEN_TYPE,
                    });
                    if let Some(e) = expires_in {
                        doc["expires_in"] = e.into();
                    }
                    json(StatusCode::OK, doc)
                }
                Answer::IssueJwt { expires_in } => {
                    let n = self.state.issued.fetch_add(1, Ordering::SeqCst);
                    let token = self.delegation_jwt(&seen, expires_in, n);
                    seen.issued = Some(token.clone());
                    json(
                        StatusCode::OK,
                        serde_json::json!({
                            "access_token": token,
                            "token_type": "Bearer",
                            "issued_token_type": ACCESS_TOKEN_TYPE,
                            "expires_in": expires_in,
                        }),
                    )
                }
                Answer::Error {
                    status,
                    error,
                    retry_after,
                } => {
                    let mut doc = serde_json::json!({"error_description": "details the proxy must not pass on: s3cr3t"});
                    if let Some(e) = error {
                        doc["error"] = e.into();
                    }
                    let mut resp = json(StatusCode::from_u16(status).expect("status"), doc);
                    if let Some(r) = retry_after {
                        resp.headers_mut()
                            .insert(http::header::RETRY_AFTER, r.parse().expect("header"));
                    }
                    resp
                }
                Answer::Garbage => Response::builder()
                    .status(StatusCode::OK)
                    .header(http::header::CONTENT_TYPE, "text/html")
                    .body(Full::new(Bytes::from_static(b"<html>maintenance</html>")))
                    .expect("response"),
            }
        };
        self.state.seen.lock().expect("lock").push(seen);
        response
    }

    /// The token of [`Answer::IssueJwt`] for request `seen`, the `n`th issued.
    fn delegation_jwt(&self, seen: &Seen, expires_in: u64, n: usize) -> String {
        let subject = seen
            .param("subject_token")
            .and_then(|t| t.split('.').nth(1))
            .and_then(|p| URL_SAFE_NO_PAD.decode(p).ok())
            .and_then(|p| serde_json::from_slice::<serde_json::Value>(&p).ok())
            .unwrap_or_default();
        let audience = match seen.params("audience").as_slice() {
            [one] => serde_json::json!(one),
            many => serde_json::json!(many),
        };
        let client_id = self.state.auth.lock().expect("lock").id().to_owned();
        let now = super::issuer::now();
        let signer = self.state.signer.lock().expect("lock").clone();
        let iss = signer
            .as_ref()
            .map_or_else(|| self.issuer(), |(iss, _)| iss.clone());
        let claims = serde_json::json!({
            "iss": iss,
            "sub": subject["sub"],
            "aud": audience,
            "act": {"sub": client_id},
            "scope": seen.param("scope"),
            "iat": now,
            "exp": now + expires_in as i64,
            "jti": format!("xt-{n}"),
        });
        match signer {
            Some((_, key)) => {
                let mut header = key.header();
                header["typ"] = serde_json::json!("at+jwt");
                key.sign(&header, &claims)
            }
            None => super::issuer::unsigned(
                &serde_json::json!({"alg": "none", "typ": "at+jwt"}),
                &claims,
            ),
        }
    }

    /// Checks the client's credentials the way an authorization server does.
    fn authenticate(&self, seen: &Seen) -> bool {
        let auth = self.state.auth.lock().expect("lock").clone();
        match auth {
            ClientAuth::Basic { id, secret } => {
                if seen.param("client_secret").is_some() || seen.param("client_assertion").is_some()
                {
                    return false; // RFC 6749 §2.3: one method only
                }
                let Some(b64) = seen
                    .authorization
                    .as_deref()
                    .and_then(|h| h.strip_prefix("Basic "))
                else {
                    return false;
                };
                let Ok(decoded) = STANDARD.decode(b64) else {
                    return false;
                };
                let Ok(decoded) = String::from_utf8(decoded) else {
                    return false;
                };
                let Some((enc_id, enc_secret)) = decoded.split_once(':') else {
                    return false;
                };
                form_decode(enc_id) == id && form_decode(enc_secret) == secret
            }
            ClientAuth::Post { id, secret } => {
                seen.authorization.is_none()
                    && seen.param("client_id") == Some(id.as_str())
                    && seen.param("client_secret") == Some(secret.as_str())
            }
            ClientAuth::PrivateKeyJwt { id, key, alg } => {
                if seen.authorization.is_some()
                    || seen.param("client_assertion_type") != Some(JWT_BEARER)
                    || seen.param("client_id").is_some_and(|c| c != id)
                {
                    return false;
                }
                let Some(assertion) = seen.param("client_assertion") else {
                    return false;
                };
                self.verify_assertion(assertion, &id, &key, alg)
            }
            ClientAuth::AssertionFile { id, path } => {
                let Ok(current) = std::fs::read_to_string(&path) else {
                    return false;
                };
                seen.authorization.is_none()
                    && seen.param("client_id") == Some(id.as_str())
                    && seen.param("client_assertion_type") == Some(JWT_BEARER)
                    && seen.param("client_assertion") == Some(current.trim())
            }
            ClientAuth::None { id } => {
                seen.authorization.is_none()
                    && seen.param("client_secret").is_none()
                    && seen.param("client_id") == Some(id.as_str())
            }
        }
    }

    /// RFC 7523 §3: signature, `iss` = `sub` = client id, `aud` = this endpoint, unexpired,
    /// and a `jti` not seen before (replay protection).
    fn verify_assertion(
        &self,
        assertion: &str,
        id: &str,
        key: &DecodingKey,
        alg: Algorithm,
    ) -> bool {
        #[derive(serde::Deserialize)]
        struct Claims {
            sub: String,
            jti: String,
            iat: u64,
            exp: u64,
        }
        let mut v = Validation::new(alg);
        v.set_audience(&[self.url()]);
        v.set_issuer(&[id]);
        v.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        v.leeway = 5;
        let Ok(data) = jsonwebtoken::decode::<Claims>(assertion, key, &v) else {
            return false;
        };
        let c = data.claims;
        if c.sub != id || c.exp <= c.iat || c.exp - c.iat > 300 {
            return false;
        }
        self.state.jtis.lock().expect("lock").insert(c.jti)
    }
}

fn form_decode(s: &str) -> String {
    url::form_urlencoded::parse(format!("v={s}").as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}

fn json(status: StatusCode, doc: serde_json::Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(http::header::CACHE_CONTROL, "no-store")
        .body(Full::new(Bytes::from(doc.to_string())))
        .expect("response")
}
