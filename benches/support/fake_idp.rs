//! A fake identity provider for the benchmarks, shared by `examples/bench_idp.rs` (a process
//! of its own, for `benches/run.sh`) and `benches/hot_path.rs` (in-process).
//!
//! It serves OIDC discovery, a JWKS with one P-256 key, and an RFC 8693 token endpoint that
//! waits a fixed delay (standing in for a real IdP's work) before answering with a fresh
//! ES256 access token for the backend and `expires_in`. It also mints ES256 client tokens for
//! the load generators (`GET /mint?n=N&tag=T`), and counts the token-endpoint calls
//! (`GET /stats`) so that a benchmark can prove how many exchanges a run caused.
//!
//! Both kinds of token are padded (a `pad` claim) to about `token_bytes` characters, so that
//! hashing, header handling and cache memory are measured with tokens the size real IdPs
//! issue, not with 300-byte toys.
//!
//! Not a general-purpose IdP: it checks only what is needed to make the proxy's requests
//! honest (grant type, subject token present, client credentials present).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// `kid` of the only signing key.
pub const KID: &str = "bench-es256";
/// `aud` of every minted client token.
pub const AUDIENCE: &str = "bench-api";
/// Lifetime of minted client tokens and of issued tokens (`expires_in`).
pub const TOKEN_LIFETIME_SECS: u64 = 3600;
/// The RFC 8693 grant type (RFC 8693 §2.1).
const TOKEN_EXCHANGE_GRANT: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
/// The token type the proxy asks for by default (RFC 8693 §3).
const ACCESS_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:access_token";
/// Largest accepted token-endpoint request body.
const MAX_FORM_BYTES: usize = 64 * 1024;
/// Largest `n` of one `/mint` call.
const MAX_MINT: usize = 1_000_000;
/// Default token size: about what Keycloak issues with its default scopes (RS256); Auth0's
/// are a little smaller, Entra ID's larger.
pub const DEFAULT_TOKEN_BYTES: usize = 1000;
/// `aud` of the tokens issued by the token endpoint.
pub const BACKEND_AUDIENCE: &str = "bench-backend";
/// Length of an ES256 signature in base64url (64 bytes).
const ES256_SIGNATURE_CHARS: usize = 86;

/// The fake IdP's state: its key, its issuer URL, its counters.
pub struct FakeIdp {
    issuer: String,
    key: EcdsaKeyPair,
    rng: SystemRandom,
    delay: Duration,
    token_bytes: usize,
    token_calls: AtomicU64,
    token_rejections: AtomicU64,
    jwks_calls: AtomicU64,
    discovery_calls: AtomicU64,
    issued: AtomicU64,
}

impl FakeIdp {
    /// Binds `listen` (port 0 is fine) and builds the IdP whose issuer is the bound address.
    /// The token endpoint waits `delay` before answering; tokens are padded to about
    /// `token_bytes` characters (0: no padding).
    pub async fn bind(
        listen: SocketAddr,
        delay: Duration,
        token_bytes: usize,
    ) -> std::io::Result<(Arc<Self>, TcpListener)> {
        let listener = TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let key = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING)
            .map_err(|_| std::io::Error::other("cannot generate a P-256 key"))?;
        let idp = Self {
            issuer: format!("http://{addr}"),
            key,
            rng: SystemRandom::new(),
            delay,
            token_bytes,
            token_calls: AtomicU64::new(0),
            token_rejections: AtomicU64::new(0),
            jwks_calls: AtomicU64::new(0),
            discovery_calls: AtomicU64::new(0),
            issued: AtomicU64::new(0),
        };
        Ok((Arc::new(idp), listener))
    }

    /// The issuer URL (`http://127.0.0.1:PORT`), also the base of every endpoint.
    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// Calls to the token endpoint so far (answered or refused).
    pub fn token_calls(&self) -> u64 {
        self.token_calls.load(Ordering::Relaxed)
    }

    /// Accepts connections forever, one task per connection (HTTP/1.1 keep-alive).
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            let _ = stream.set_nodelay(true);
            let idp = self.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let idp = idp.clone();
                    async move { Ok::<_, std::convert::Infallible>(idp.handle(req).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .keep_alive(true)
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    }

    /// The JWKS document (RFC 7517) with the public half of the signing key.
    pub fn jwks(&self) -> String {
        // Uncompressed point: 0x04 || X (32 bytes) || Y (32 bytes).
        let point = self.key.public_key().as_ref();
        let (x, y) = (&point[1..33], &point[33..65]);
        serde_json::json!({
            "keys": [{
                "kty": "EC",
                "crv": "P-256",
                "use": "sig",
                "alg": "ES256",
                "kid": KID,
                "x": URL_SAFE_NO_PAD.encode(x),
                "y": URL_SAFE_NO_PAD.encode(y),
            }]
        })
        .to_string()
    }

    /// The discovery document (OpenID Connect Discovery 1.0 §3, RFC 8414 §2).
    pub fn discovery(&self) -> String {
        let i = &self.issuer;
        serde_json::json!({
            "issuer": i,
            "jwks_uri": format!("{i}/jwks"),
            "token_endpoint": format!("{i}/token"),
            "grant_types_supported": [TOKEN_EXCHANGE_GRANT],
            "token_endpoint_auth_methods_supported": ["client_secret_post", "client_secret_basic"],
        })
        .to_string()
    }

    /// One ES256 client token for subject `user-{tag}-{i}`, valid for an hour from now.
    pub fn mint(&self, tag: &str, i: usize) -> String {
        let now = unix_now();
        self.sign(serde_json::json!({
            "iss": self.issuer,
            "sub": format!("user-{tag}-{i}"),
            "aud": AUDIENCE,
            "iat": now,
            "exp": now + TOKEN_LIFETIME_SECS,
            "jti": format!("{tag}-{i}"),
            "scope": "mcp:tools",
        }))
    }

    /// A compact ES256 JWS of `claims`, with a `pad` claim added to reach about
    /// `token_bytes` characters.
    fn sign(&self, mut claims: serde_json::Value) -> String {
        let header = URL_SAFE_NO_PAD
            .encode(serde_json::json!({"alg": "ES256", "typ": "JWT", "kid": KID}).to_string());
        let mut json = claims.to_string();
        // header . base64url(claims) . signature: claims may take 3/4 of what is left.
        let room = self
            .token_bytes
            .saturating_sub(header.len() + 2 + ES256_SIGNATURE_CHARS)
            * 3
            / 4;
        let pad_overhead = r#","pad":"""#.len();
        if room > json.len() + pad_overhead {
            claims["pad"] = "x".repeat(room - json.len() - pad_overhead).into();
            json = claims.to_string();
        }
        let signing_input = format!("{header}.{}", URL_SAFE_NO_PAD.encode(json));
        let signature = match self.key.sign(&self.rng, signing_input.as_bytes()) {
            Ok(s) => URL_SAFE_NO_PAD.encode(s.as_ref()),
            // Signing with a valid in-memory key does not fail; an empty signature would be
            // refused by the proxy and show up as errors in the run, never silently.
            Err(_) => String::new(),
        };
        format!("{signing_input}.{signature}")
    }

    /// Answers one request.
    pub async fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        match (req.method(), req.uri().path()) {
            (&Method::GET, "/.well-known/openid-configuration")
            | (&Method::GET, "/.well-known/oauth-authorization-server") => {
                self.discovery_calls.fetch_add(1, Ordering::Relaxed);
                json(StatusCode::OK, self.discovery())
            }
            (&Method::GET, "/jwks") => {
                self.jwks_calls.fetch_add(1, Ordering::Relaxed);
                let mut resp = json(StatusCode::OK, self.jwks());
                resp.headers_mut().insert(
                    header::CACHE_CONTROL,
                    http::HeaderValue::from_static("max-age=3600"),
                );
                resp
            }
            (&Method::POST, "/token") => self.token(req).await,
            // An OTLP/HTTP trace sink for the proxy's traces (benches/telemetry.sh): accepts
            // and discards, as a collector that keeps up would.
            (&Method::POST, "/v1/traces") => {
                let _ = req.into_body().collect().await;
                let mut resp = Response::new(Full::new(Bytes::new()));
                resp.headers_mut().insert(
                    header::CONTENT_TYPE,
                    http::HeaderValue::from_static("application/x-protobuf"),
                );
                resp
            }
            (&Method::GET, "/stats") => json(
                StatusCode::OK,
                serde_json::json!({
                    "token_calls": self.token_calls.load(Ordering::Relaxed),
                    "token_rejections": self.token_rejections.load(Ordering::Relaxed),
                    "jwks_calls": self.jwks_calls.load(Ordering::Relaxed),
                    "discovery_calls": self.discovery_calls.load(Ordering::Relaxed),
                })
                .to_string(),
            ),
            (&Method::GET, "/mint") => self.mint_many(req.uri().query().unwrap_or("")),
            _ => json(StatusCode::NOT_FOUND, r#"{"error":"not_found"}"#.to_owned()),
        }
    }

    /// `GET /mint?n=N&tag=T`: N tokens, one per line, subjects `user-T-0` … `user-T-(N-1)`.
    fn mint_many(&self, query: &str) -> Response<Full<Bytes>> {
        let mut n = 1usize;
        let mut tag = String::from("t");
        for (k, v) in url::form_urlencoded::parse(query.as_bytes()) {
            match &*k {
                "n" => n = v.parse().unwrap_or(1).min(MAX_MINT),
                "tag" => tag = v.chars().filter(char::is_ascii_alphanumeric).collect(),
                _ => {}
            }
        }
        let mut out = String::with_capacity(n * 400);
        for i in 0..n {
            out.push_str(&self.mint(&tag, i));
            out.push('\n');
        }
        let mut resp = Response::new(Full::new(Bytes::from(out)));
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            http::HeaderValue::from_static("text/plain"),
        );
        resp
    }

    /// `POST /token`: RFC 8693 token exchange after the configured delay.
    async fn token(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        self.token_calls.fetch_add(1, Ordering::Relaxed);
        let body = match Limited::new(req.into_body(), MAX_FORM_BYTES)
            .collect()
            .await
        {
            Ok(b) => b.to_bytes(),
            Err(_) => return self.refuse("invalid_request"),
        };
        let (mut grant, mut subject, mut client) = (false, false, false);
        for (k, v) in url::form_urlencoded::parse(&body) {
            match &*k {
                "grant_type" => grant = v == TOKEN_EXCHANGE_GRANT,
                "subject_token" => subject = !v.is_empty(),
                "client_id" | "client_secret" => client = !v.is_empty(),
                _ => {}
            }
        }
        if !grant || !subject {
            return self.refuse("invalid_request");
        }
        if !client {
            return self.refuse("invalid_client");
        }
        tokio::time::sleep(self.delay).await;
        let n = self.issued.fetch_add(1, Ordering::Relaxed);
        let now = unix_now();
        let access_token = self.sign(serde_json::json!({
            "iss": self.issuer,
            "sub": format!("exchanged-{n}"),
            "aud": BACKEND_AUDIENCE,
            "iat": now,
            "exp": now + TOKEN_LIFETIME_SECS,
            "jti": format!("x-{n}"),
            "scope": "mcp:tools",
            "act": {"sub": "txp-bench"},
        }));
        json(
            StatusCode::OK,
            serde_json::json!({
                "access_token": access_token,
                "token_type": "Bearer",
                "issued_token_type": ACCESS_TOKEN_TYPE,
                "expires_in": TOKEN_LIFETIME_SECS,
            })
            .to_string(),
        )
    }

    fn refuse(&self, code: &str) -> Response<Full<Bytes>> {
        self.token_rejections.fetch_add(1, Ordering::Relaxed);
        json(
            StatusCode::BAD_REQUEST,
            serde_json::json!({ "error": code }).to_string(),
        )
    }
}

fn json(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    resp
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
