//! An in-process token issuer on 127.0.0.1:0: OIDC discovery, a JWKS that tests change at
//! runtime (rotate keys, take the endpoint down and up), RFC 7662 introspection, and counters
//! of every fetch. Keys are generated in-process with aws-lc-rs; tokens are minted from
//! arbitrary header and claims JSON so that hostile tokens can be built as easily as good ones.

#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rsa::KeySize;
use aws_lc_rs::signature::{
    self as sig, EcdsaKeyPair, KeyPair, RsaKeyPair, RsaPublicKeyComponents,
};
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use jsonwebtoken::{Algorithm, EncodingKey};
use serde_json::{Value, json};
use tokio::net::TcpListener;

/// base64url without padding, as in a JWS.
pub fn b64(bytes: impl AsRef<[u8]>) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// Seconds since the Unix epoch.
pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// A signing key with its public JWK.
#[derive(Clone)]
pub struct Key {
    pub kid: String,
    /// The algorithm this key signs with by default (RS256 or ES256).
    pub alg: Algorithm,
    encoding: EncodingKey,
    jwk: Value,
    /// SubjectPublicKeyInfo DER of the public key.
    pub public_der: Vec<u8>,
}

impl Key {
    /// A fresh RSA 2048 key.
    pub fn rsa(kid: &str) -> Self {
        let pair = RsaKeyPair::generate(KeySize::Rsa2048).expect("rsa keygen");
        let pkcs8 = pair.as_der().expect("pkcs8");
        let encoding = EncodingKey::from_rsa_der(pkcs1_from_pkcs8(pkcs8.as_ref()));
        let c = RsaPublicKeyComponents::<Vec<u8>>::from(pair.public_key());
        let public_der = pair.public_key().as_der().expect("spki").as_ref().to_vec();
        Self {
            kid: kid.into(),
            alg: Algorithm::RS256,
            encoding,
            jwk: json!({"kty": "RSA", "kid": kid, "use": "sig", "n": b64(&c.n), "e": b64(&c.e)}),
            public_der,
        }
    }

    /// A fresh EC P-256 key.
    pub fn ec(kid: &str) -> Self {
        let pair =
            EcdsaKeyPair::generate(&sig::ECDSA_P256_SHA256_FIXED_SIGNING).expect("ec keygen");
        let pkcs8 = pair.to_pkcs8v1().expect("pkcs8");
        let encoding = EncodingKey::from_ec_der(pkcs8.as_ref());
        let point = pair.public_key().as_ref();
        let public_der = pair.public_key().as_der().expect("spki").as_ref().to_vec();
        Self {
            kid: kid.into(),
            alg: Algorithm::ES256,
            encoding,
            jwk: json!({
                "kty": "EC", "kid": kid, "use": "sig", "crv": "P-256",
                "x": b64(&point[1..33]), "y": b64(&point[33..]),
            }),
            public_der,
        }
    }

    /// The public JWK.
    pub fn jwk(&self) -> Value {
        self.jwk.clone()
    }

    /// The public key as PEM (`BEGIN PUBLIC KEY`), as an attacker would download it.
    pub fn public_pem(&self) -> String {
        let body = STANDARD.encode(&self.public_der);
        let lines: Vec<&str> = body
            .as_bytes()
            .chunks(64)
            .map(|c| std::str::from_utf8(c).expect("ascii"))
            .collect();
        format!(
            "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n",
            lines.join("\n")
        )
    }

    /// `header.claims.signature`, signed with this key's own algorithm whatever the header says.
    pub fn sign(&self, header: &Value, claims: &Value) -> String {
        self.sign_with(self.alg, header, claims)
    }

    /// As [`Key::sign`] with an explicit signing algorithm (PS256 with an RSA key, say).
    pub fn sign_with(&self, alg: Algorithm, header: &Value, claims: &Value) -> String {
        sign_raw(
            &header.to_string(),
            &claims.to_string(),
            &self.encoding,
            alg,
        )
    }

    /// Signs pre-serialised header and claims texts (for JSON that `Value` cannot express,
    /// such as duplicate members).
    pub fn sign_texts(&self, header: &str, claims: &str) -> String {
        sign_raw(header, claims, &self.encoding, self.alg)
    }

    /// The standard header of this key: `{"alg", "kid", "typ": "at+jwt"}`.
    pub fn header(&self) -> Value {
        json!({"alg": format!("{:?}", self.alg), "kid": self.kid, "typ": "at+jwt"})
    }
}

fn sign_raw(header: &str, claims: &str, key: &EncodingKey, alg: Algorithm) -> String {
    let input = format!("{}.{}", b64(header), b64(claims));
    let signature = jsonwebtoken::crypto::sign(input.as_bytes(), key, alg).expect("sign");
    format!("{input}.{signature}")
}

/// An HS256 token whose MAC key is `secret` (e.g. a public key, for the confusion attack).
pub fn hs256(secret: &[u8], header: &Value, claims: &Value) -> String {
    sign_raw(
        &header.to_string(),
        &claims.to_string(),
        &EncodingKey::from_secret(secret),
        Algorithm::HS256,
    )
}

/// An unsecured JWS (RFC 7515 Appendix A.5): empty signature.
pub fn unsigned(header: &Value, claims: &Value) -> String {
    format!("{}.{}.", b64(header.to_string()), b64(claims.to_string()))
}

/// Reads one DER TLV: (tag, contents, rest).
fn tlv(input: &[u8]) -> (u8, &[u8], &[u8]) {
    let tag = input[0];
    let (len, header) = match input[1] {
        n if n < 0x80 => (n as usize, 2),
        n => {
            let bytes = (n & 0x7f) as usize;
            let len = input[2..2 + bytes]
                .iter()
                .fold(0usize, |acc, b| (acc << 8) | *b as usize);
            (len, 2 + bytes)
        }
    };
    (tag, &input[header..header + len], &input[header + len..])
}

/// The RSAPrivateKey (PKCS#1) inside a PrivateKeyInfo (PKCS#8, RFC 5208 §5): jsonwebtoken's
/// `from_rsa_der` wants the former, aws-lc exports the latter.
fn pkcs1_from_pkcs8(pkcs8: &[u8]) -> &[u8] {
    let (tag, info, _) = tlv(pkcs8);
    assert_eq!(tag, 0x30, "PrivateKeyInfo is a SEQUENCE");
    let (_, _version, rest) = tlv(info);
    let (_, _algorithm, rest) = tlv(rest);
    let (tag, private_key, _) = tlv(rest);
    assert_eq!(tag, 0x04, "privateKey is an OCTET STRING");
    private_key
}

/// What the issuer serves; changed by the tests while it runs.
#[derive(Default)]
struct State {
    issuer: Mutex<String>,
    jwks: Mutex<Value>,
    jwks_up: AtomicBool,
    discovery_up: AtomicBool,
    cache_control: Mutex<Option<String>>,
    jwks_fetches: AtomicUsize,
    discovery_fetches: AtomicUsize,
    introspections: AtomicUsize,
    /// Opaque token → introspection response.
    opaque: Mutex<HashMap<String, Value>>,
    /// Expected `Authorization` of introspection calls.
    introspection_auth: Mutex<Option<String>>,
}

/// The running issuer.
#[derive(Clone)]
pub struct Issuer {
    pub addr: SocketAddr,
    state: Arc<State>,
}

impl Issuer {
    /// Starts serving `GET /.well-known/openid-configuration`, `GET /jwks` and
    /// `POST /introspect`, with an empty JWKS, everything up.
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind issuer");
        let addr = listener.local_addr().expect("addr");
        let state = Arc::new(State::default());
        *state.issuer.lock().expect("lock") = format!("http://{addr}");
        *state.jwks.lock().expect("lock") = json!({"keys": []});
        state.jwks_up.store(true, Ordering::SeqCst);
        state.discovery_up.store(true, Ordering::SeqCst);
        let s = state.clone();
        super::serve(listener, move |req| {
            let s = s.clone();
            async move { route(&s, req).await }
        });
        Self { addr, state }
    }

    /// The issuer identifier (`http://127.0.0.1:PORT`), as named in discovery.
    pub fn url(&self) -> String {
        self.state.issuer.lock().expect("lock").clone()
    }

    /// The JWKS URL.
    pub fn jwks_uri(&self) -> String {
        format!("http://{}/jwks", self.addr)
    }

    /// Publishes exactly these keys.
    pub fn publish(&self, keys: &[&Key]) {
        self.publish_jwks(json!({"keys": keys.iter().map(|k| k.jwk()).collect::<Vec<_>>()}));
    }

    /// Publishes an arbitrary JWKS document.
    pub fn publish_jwks(&self, doc: Value) {
        *self.state.jwks.lock().expect("lock") = doc;
    }

    /// `false`: `/jwks` answers 503.
    pub fn set_jwks_up(&self, up: bool) {
        self.state.jwks_up.store(up, Ordering::SeqCst);
    }

    /// `false`: discovery answers 503.
    pub fn set_discovery_up(&self, up: bool) {
        self.state.discovery_up.store(up, Ordering::SeqCst);
    }

    /// A `Cache-Control` header for JWKS responses.
    pub fn set_jwks_cache_control(&self, value: Option<&str>) {
        *self.state.cache_control.lock().expect("lock") = value.map(String::from);
    }

    /// JWKS requests received (answered or not).
    pub fn jwks_fetches(&self) -> usize {
        self.state.jwks_fetches.load(Ordering::SeqCst)
    }

    /// Discovery requests received.
    pub fn discovery_fetches(&self) -> usize {
        self.state.discovery_fetches.load(Ordering::SeqCst)
    }

    /// Introspection requests received.
    pub fn introspections(&self) -> usize {
        self.state.introspections.load(Ordering::SeqCst)
    }

    /// Registers an opaque token and what introspection says about it.
    pub fn register_opaque(&self, token: &str, response: Value) {
        self.state
            .opaque
            .lock()
            .expect("lock")
            .insert(token.into(), response);
    }

    /// Introspection calls must carry HTTP Basic with these (already form-urlencoded, as
    /// RFC 6749 §2.3.1 requires) credentials; others get 401.
    pub fn require_introspection_basic(&self, id: &str, secret: &str) {
        let value = format!("Basic {}", STANDARD.encode(format!("{id}:{secret}")));
        *self.state.introspection_auth.lock().expect("lock") = Some(value);
    }

    /// Standard claims for a token from this issuer to `aud`, valid for ten minutes.
    pub fn claims(&self, aud: &str, scope: &str) -> Value {
        let now = now();
        json!({
            "iss": self.url(), "sub": "alice", "aud": aud, "scope": scope,
            "iat": now, "nbf": now, "exp": now + 600,
            "jti": format!("{:x}", rand_u64()),
        })
    }
}

/// A random 64-bit value (unique token ids, random `kid`s).
pub fn rand_u64() -> u64 {
    let mut b = [0u8; 8];
    aws_lc_rs::rand::fill(&mut b).expect("random");
    u64::from_le_bytes(b)
}

fn respond(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(body.into()))
        .expect("response")
}

async fn route(s: &State, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_owned();
    match path.as_str() {
        "/.well-known/openid-configuration" | "/.well-known/oauth-authorization-server" => {
            s.discovery_fetches.fetch_add(1, Ordering::SeqCst);
            if !s.discovery_up.load(Ordering::SeqCst) {
                return respond(StatusCode::SERVICE_UNAVAILABLE, "{}");
            }
            let issuer = s.issuer.lock().expect("lock").clone();
            let doc = json!({
                "issuer": issuer,
                "jwks_uri": format!("{issuer}/jwks"),
                "introspection_endpoint": format!("{issuer}/introspect"),
                "token_endpoint": format!("{issuer}/token"),
            });
            respond(StatusCode::OK, doc.to_string())
        }
        "/jwks" => {
            s.jwks_fetches.fetch_add(1, Ordering::SeqCst);
            if !s.jwks_up.load(Ordering::SeqCst) {
                return respond(StatusCode::SERVICE_UNAVAILABLE, "{}");
            }
            let mut resp = respond(StatusCode::OK, s.jwks.lock().expect("lock").to_string());
            if let Some(cc) = s.cache_control.lock().expect("lock").as_deref() {
                resp.headers_mut()
                    .insert("cache-control", cc.parse().expect("header"));
            }
            resp
        }
        "/introspect" => {
            s.introspections.fetch_add(1, Ordering::SeqCst);
            let expected = s.introspection_auth.lock().expect("lock").clone();
            let given = req
                .headers()
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .map(String::from);
            if expected.is_some() && expected != given {
                return respond(StatusCode::UNAUTHORIZED, r#"{"error":"invalid_client"}"#);
            }
            let body = req
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            let token = url::form_urlencoded::parse(&body)
                .find(|(k, _)| k == "token")
                .map(|(_, v)| v.into_owned())
                .unwrap_or_default();
            let answer = s
                .opaque
                .lock()
                .expect("lock")
                .get(&token)
                .cloned()
                .unwrap_or(json!({"active": false}));
            respond(StatusCode::OK, answer.to_string())
        }
        _ => respond(StatusCode::NOT_FOUND, "{}"),
    }
}
