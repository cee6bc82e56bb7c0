//! The issuer's signing keys: a JWK Set (RFC 7517 §5) turned into verification keys once, when
//! it is fetched, and the store that swaps sets in and rate-limits refetches.
//!
//! jsonwebtoken reads each JWK ([`Jwk`]) and builds its key ([`DecodingKey::from_jwk`]); the
//! proxy adds what it does not check: what the key is for (`use`, `key_ops`), a type and curve
//! it can verify with, the RSA modulus size and the EC and Ed25519 key lengths.
//!
//! Key selection follows RFC 7515 §4.1.4 and RFC 8725 §3.1: the token's `kid` names one key;
//! the key's type and curve must fit the token's `alg` (RFC 7518 §3.1) and, when the JWK
//! carries an `alg` (RFC 7517 §4.4), it must be the token's. Only one key is ever tried.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

use aws_lc_rs::digest;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyOperations, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};
use serde::Deserialize;
use url::Url;

use super::jwt::{self, Segments};

/// More keys than any IdP publishes (two or three during a rotation, per algorithm).
pub const MAX_KEYS: usize = 64;

/// RSA moduli the verifier accepts (aws-lc's `RSA_PKCS1_2048_8192_*` and PSS equivalents);
/// smaller keys are factorable (NIST SP 800-131A retired them).
const RSA_MIN_BITS: usize = 2048;
const RSA_MAX_BITS: usize = 8192;

/// The kind of public key, which decides the algorithms it can verify.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyType {
    /// `kty: RSA`: RS256/384/512, PS256/384/512.
    Rsa,
    /// `kty: EC, crv: P-256`: ES256.
    P256,
    /// `kty: EC, crv: P-384`: ES384.
    P384,
    /// `kty: OKP, crv: Ed25519`: EdDSA (RFC 8037).
    Ed25519,
}

impl KeyType {
    /// True when a key of this type can verify `alg` (RFC 7518 §3.1, RFC 8037 §3.1).
    pub fn fits(self, alg: Algorithm) -> bool {
        use Algorithm::*;
        matches!(
            (self, alg),
            (KeyType::Rsa, RS256 | RS384 | RS512 | PS256 | PS384 | PS512)
                | (KeyType::P256, ES256)
                | (KeyType::P384, ES384)
                | (KeyType::Ed25519, EdDSA)
        )
    }
}

/// One usable verification key.
#[derive(Debug)]
pub struct VerifyKey {
    /// The JWK's `kid`.
    pub kid: Option<String>,
    /// The key's type and curve.
    pub ty: KeyType,
    /// The JWK's `alg`, when it names one.
    pub alg: Option<Algorithm>,
    key: DecodingKey,
    /// SHA-256 over `kid` and the key material: tells whether a key left the set.
    fingerprint: [u8; 32],
}

impl VerifyKey {
    /// True when this key may verify a token signed with `alg`.
    pub fn fits(&self, alg: Algorithm) -> bool {
        self.ty.fits(alg) && self.alg.is_none_or(|a| a == alg)
    }

    /// Verifies the JWS signature of `segments` with this key (RFC 7515 §5.2 step 8).
    pub fn verify(&self, segments: &Segments<'_>, alg: Algorithm) -> bool {
        if !self.fits(alg) {
            return false;
        }
        jsonwebtoken::crypto::verify(
            segments.signature,
            segments.signing_input.as_bytes(),
            &self.key,
            alg,
        )
        .unwrap_or(false)
    }
}

/// A JWK Set document. Each key stays generic JSON until it is read on its own as a [`Jwk`]:
/// jsonwebtoken's `JwkSet` reads them all at once, so one odd key (an unknown `kty`, an
/// encryption key of a kind it does not know) would fail the whole set instead of being skipped.
#[derive(Debug, Deserialize)]
pub struct JwkSetDocument {
    pub keys: Vec<serde_json::Value>,
}

/// Converts one JWK into a verification key, or says why it cannot be used.
pub fn key_from_jwk(value: &serde_json::Value) -> Result<VerifyKey, &'static str> {
    let jwk = Jwk::deserialize(value).map_err(|_| "not a JWK")?;
    // RFC 7517 §4.2: a key whose `use` is not `sig` is not for verifying signatures.
    if jwk
        .common
        .public_key_use
        .as_ref()
        .is_some_and(|u| *u != PublicKeyUse::Signature)
    {
        return Err("use is not sig");
    }
    // RFC 7517 §4.3: when `key_ops` is present it must allow verification.
    if jwk
        .common
        .key_operations
        .as_ref()
        .is_some_and(|ops| !ops.contains(&KeyOperations::Verify))
    {
        return Err("key_ops does not include verify");
    }
    if let AlgorithmParameters::OctetKey(_) = jwk.algorithm {
        return Err("symmetric keys are never used");
    }
    let key = DecodingKey::from_jwk(&jwk).map_err(|_| "key parameter is not base64url")?;
    let (ty, key, material) = checked(&jwk.algorithm, key)?;
    let alg = match jwk.common.key_algorithm {
        None => None,
        // `KeyAlgorithm` displays the JWA name of each signature algorithm.
        Some(name) => {
            let alg = jwt::parse_alg(&name.to_string()).ok_or("alg not supported")?;
            if !ty.fits(alg) {
                return Err("alg does not fit the key type");
            }
            Some(alg)
        }
    };
    let mut ctx = digest::Context::new(&digest::SHA256);
    let kid = jwk.common.key_id.unwrap_or_default();
    ctx.update(&(kid.len() as u64).to_be_bytes());
    ctx.update(kid.as_bytes());
    ctx.update(&[ty as u8]);
    ctx.update(&material);
    let mut fingerprint = [0u8; 32];
    fingerprint.copy_from_slice(ctx.finish().as_ref());
    Ok(VerifyKey {
        kid: (!kid.is_empty()).then_some(kid),
        ty,
        alg,
        key,
        fingerprint,
    })
}

/// The checks jsonwebtoken does not make on the `key` it built from `params`: a type and curve
/// the proxy verifies with, the RSA modulus size and exponent length, the EC coordinate and
/// Ed25519 key lengths. Returns the key's type, the key, and the bytes that identify it (its
/// fingerprint is taken over them).
fn checked(
    params: &AlgorithmParameters,
    key: DecodingKey,
) -> Result<(KeyType, DecodingKey, Vec<u8>), &'static str> {
    Ok(match params {
        AlgorithmParameters::RSA(p) => {
            let (n, e) = (b64(&p.n)?, b64(&p.e)?);
            let leading = n.iter().take_while(|b| **b == 0).count();
            let n = &n[leading..];
            let Some(first) = n.first() else {
                return Err("RSA modulus is zero");
            };
            let bits = n.len() * 8 - first.leading_zeros() as usize;
            if !(RSA_MIN_BITS..=RSA_MAX_BITS).contains(&bits) {
                return Err("RSA modulus size not accepted");
            }
            if e.is_empty() || e.len() > 8 {
                return Err("RSA exponent not accepted");
            }
            // aws-lc refuses a modulus with leading zero bytes, which RFC 7518 §6.3.1.1 forbids
            // and some IdPs send anyway: then the same key, without them.
            let key = if leading > 0 {
                DecodingKey::from_rsa_raw_components(n, &e)
            } else {
                key
            };
            (KeyType::Rsa, key, [n, &[0], &e].concat())
        }
        AlgorithmParameters::EllipticCurve(p) => {
            let (ty, len) = match p.curve {
                EllipticCurve::P256 => (KeyType::P256, 32),
                EllipticCurve::P384 => (KeyType::P384, 48),
                _ => return Err("key type or curve not supported"),
            };
            let (x, y) = (b64(&p.x)?, b64(&p.y)?);
            if x.len() != len || y.len() != len {
                return Err("EC coordinates do not fit the curve");
            }
            // The uncompressed point (SEC 1 §2.3.3), as jsonwebtoken builds it from x and y.
            (ty, key, [&[0x04], x.as_slice(), &y].concat())
        }
        AlgorithmParameters::OctetKeyPair(p) if p.curve == EllipticCurve::Ed25519 => {
            // The raw public key (RFC 8037 §2).
            let x = b64(&p.x)?;
            if x.len() != 32 {
                return Err("Ed25519 key has the wrong length");
            }
            (KeyType::Ed25519, key, x)
        }
        _ => return Err("key type or curve not supported"),
    })
}

/// A base64url key parameter (RFC 7518 §6), decoded as jsonwebtoken decodes it.
fn b64(param: &str) -> Result<Vec<u8>, &'static str> {
    URL_SAFE_NO_PAD
        .decode(param)
        .map_err(|_| "key parameter is not base64url")
}

/// Why no key could be chosen for a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SelectError {
    /// No key has the token's `kid`: perhaps a rotation the proxy has not seen yet.
    UnknownKid,
    /// The token has no `kid` and the set has more than one key.
    NoKid,
    /// The key named by `kid` cannot verify the token's `alg`.
    Mismatch,
}

/// A set of usable keys, indexed by `kid`.
#[derive(Debug, Default)]
pub struct KeySet {
    keys: Vec<Arc<VerifyKey>>,
    by_kid: HashMap<String, Vec<Arc<VerifyKey>>>,
}

impl KeySet {
    /// Builds the set from a JWKS document; returns it and the reasons keys were skipped.
    pub fn from_document(doc: &JwkSetDocument) -> (Self, Vec<&'static str>) {
        let mut set = KeySet::default();
        let mut skipped = Vec::new();
        for value in &doc.keys {
            match key_from_jwk(value) {
                Ok(_) if set.keys.len() >= MAX_KEYS => skipped.push("too many keys"),
                Ok(k) if set.keys.iter().any(|old| old.fingerprint == k.fingerprint) => {}
                Ok(k) => {
                    let k = Arc::new(k);
                    if let Some(kid) = &k.kid {
                        set.by_kid
                            .entry(kid.clone())
                            .or_default()
                            .push(Arc::clone(&k));
                    }
                    set.keys.push(k);
                }
                Err(why) => skipped.push(why),
            }
        }
        (set, skipped)
    }

    /// Number of usable keys.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// True when the set has no usable key.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Chooses the one key that may verify a token with `kid` and `alg`. A token without
    /// `kid` is verified only when the set holds exactly one usable key.
    pub fn select(&self, kid: Option<&str>, alg: Algorithm) -> Result<Arc<VerifyKey>, SelectError> {
        match kid {
            Some(kid) => {
                let candidates = self.by_kid.get(kid).ok_or(SelectError::UnknownKid)?;
                candidates
                    .iter()
                    .find(|k| k.fits(alg))
                    .cloned()
                    .ok_or(SelectError::Mismatch)
            }
            None => match self.keys.as_slice() {
                [only] if only.fits(alg) => Ok(Arc::clone(only)),
                [_] => Err(SelectError::Mismatch),
                _ => Err(SelectError::NoKid),
            },
        }
    }

    /// True when a key of `self` is missing from `next`: tokens verified with it must be
    /// verified again.
    pub fn loses_keys_in(&self, next: &KeySet) -> bool {
        self.keys
            .iter()
            .any(|k| !next.keys.iter().any(|n| n.fingerprint == k.fingerprint))
    }
}

/// The `max-age` of a `Cache-Control` response header (RFC 9111 §5.2.2.1); `no-store` and
/// `no-cache` count as zero. `None` when the IdP says nothing.
pub fn max_age(headers: &http::HeaderMap) -> Option<Duration> {
    let mut found = None;
    for value in headers.get_all(http::header::CACHE_CONTROL) {
        let Ok(value) = value.to_str() else { continue };
        for directive in value.split(',') {
            let (name, arg) = match directive.split_once('=') {
                Some((n, a)) => (n.trim(), Some(a.trim().trim_matches('"'))),
                None => (directive.trim(), None),
            };
            if name.eq_ignore_ascii_case("no-store") || name.eq_ignore_ascii_case("no-cache") {
                return Some(Duration::ZERO);
            }
            if name.eq_ignore_ascii_case("max-age")
                && let Some(secs) = arg.and_then(|a| a.parse::<u64>().ok())
            {
                found = Some(Duration::from_secs(secs));
            }
        }
    }
    found
}

/// What a refetch for an unknown `kid` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refetch {
    /// This caller fetched and installed a new set; `lost_keys` as in [`KeySet::loses_keys_in`].
    Fetched { lost_keys: bool },
    /// Another fetch completed while this caller waited: look again.
    Coalesced,
    /// The last unknown-`kid` refetch was too recent.
    Limited,
    /// The fetch failed; the last good set stays.
    Failed,
}

#[derive(Debug, Default)]
struct Current {
    set: Option<Arc<KeySet>>,
    /// Incremented on every install; tells a waiter whether the set changed meanwhile.
    generation: u64,
}

#[derive(Debug, Default)]
struct FetchState {
    last_unknown_kid_fetch: Option<tokio::time::Instant>,
}

/// The current key set, where it comes from, and the lock that serialises fetches.
#[derive(Debug)]
pub struct KeyStore {
    uri: OnceLock<Url>,
    current: RwLock<Current>,
    /// Held for the duration of every fetch, so concurrent callers wait for one fetch.
    fetch: tokio::sync::Mutex<FetchState>,
    unknown_kid_interval: Duration,
}

impl KeyStore {
    /// An empty store; `uri` is `None` until discovery names it.
    pub fn new(uri: Option<Url>, unknown_kid_interval: Duration) -> Self {
        let cell = OnceLock::new();
        if let Some(u) = uri {
            let _ = cell.set(u);
        }
        Self {
            uri: cell,
            current: RwLock::new(Current::default()),
            fetch: tokio::sync::Mutex::new(FetchState::default()),
            unknown_kid_interval,
        }
    }

    /// The JWKS URL, once known.
    pub fn uri(&self) -> Option<&Url> {
        self.uri.get()
    }

    /// Sets the JWKS URL found by discovery (first value wins).
    pub fn set_uri(&self, uri: Url) {
        let _ = self.uri.set(uri);
    }

    /// The current set and its generation; `None` before the first successful load.
    pub fn snapshot(&self) -> Option<(Arc<KeySet>, u64)> {
        let cur = self
            .current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        cur.set.as_ref().map(|s| (Arc::clone(s), cur.generation))
    }

    fn install(&self, set: KeySet) -> bool {
        let mut cur = self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let lost = cur.set.as_ref().is_some_and(|old| old.loses_keys_in(&set));
        cur.set = Some(Arc::new(set));
        cur.generation += 1;
        lost
    }

    fn generation(&self) -> u64 {
        self.current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .generation
    }

    /// Runs `fetch` while holding the fetch lock and installs what it returns. Returns
    /// `(lost_keys, extra)` on success; on failure the last good set stays.
    pub async fn refresh<T, Fut>(&self, fetch: Fut) -> Option<(bool, T)>
    where
        Fut: Future<Output = Option<(KeySet, T)>>,
    {
        let _guard = self.fetch.lock().await;
        let (set, extra) = fetch.await?;
        Some((self.install(set), extra))
    }

    /// Refetches because a token named a `kid` not in the set whose generation was `seen`.
    /// Concurrent callers wait for one fetch; after an unknown-`kid` fetch, the next one may
    /// start only when `unknown_kid_interval` has passed, so a flood of invented `kid`s costs
    /// the IdP at most one request per interval.
    pub async fn refetch_for_unknown_kid<T, F, Fut>(&self, seen: u64, fetch: F) -> Refetch
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Option<(KeySet, T)>>,
    {
        let mut state = self.fetch.lock().await;
        if self.generation() != seen {
            return Refetch::Coalesced;
        }
        let now = tokio::time::Instant::now();
        if state
            .last_unknown_kid_fetch
            .is_some_and(|t| now.duration_since(t) < self.unknown_kid_interval)
        {
            return Refetch::Limited;
        }
        state.last_unknown_kid_fetch = Some(now);
        match fetch().await {
            Some((set, _)) => Refetch::Fetched {
                lost_keys: self.install(set),
            },
            None => Refetch::Failed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use aws_lc_rs::rand::SystemRandom;
    use aws_lc_rs::signature::{self as sig, EcdsaKeyPair, KeyPair};
    use serde_json::json;

    fn b64u(bytes: &[u8]) -> String {
        URL_SAFE_NO_PAD.encode(bytes)
    }

    /// An RSA JWK with a 2048-bit modulus of the given filler (not a real key; enough for
    /// selection tests).
    fn rsa_jwk(kid: &str) -> serde_json::Value {
        let mut n = vec![0xC5u8; 256];
        n[255] = kid.len() as u8;
        json!({"kty": "RSA", "kid": kid, "n": b64u(&n), "e": "AQAB"})
    }

    fn ec_jwk(kid: &str, crv: &str, len: usize) -> serde_json::Value {
        json!({"kty": "EC", "kid": kid, "crv": crv, "x": b64u(&vec![1; len]), "y": b64u(&vec![2; len])})
    }

    fn set(keys: Vec<serde_json::Value>) -> KeySet {
        KeySet::from_document(&JwkSetDocument { keys }).0
    }

    #[test]
    fn keys_not_meant_for_signatures_are_skipped() {
        let mut enc = rsa_jwk("enc");
        enc["use"] = "enc".into();
        let mut ops = rsa_jwk("ops");
        ops["key_ops"] = json!(["encrypt"]);
        let mut sig_ops = rsa_jwk("sig-ops");
        sig_ops["key_ops"] = json!(["verify"]);
        let mut sig_use = rsa_jwk("sig-use");
        sig_use["use"] = "sig".into();
        let oct = json!({"kty": "oct", "kid": "hmac", "k": "c2VjcmV0"});
        let (s, skipped) = KeySet::from_document(&JwkSetDocument {
            keys: vec![
                enc,
                ops,
                sig_ops,
                sig_use,
                oct,
                json!({"kty": "foo"}),
                json!(42),
            ],
        });
        assert_eq!(s.len(), 2);
        assert_eq!(skipped.len(), 5);
        assert!(s.select(Some("sig-ops"), Algorithm::RS256).is_ok());
        assert_eq!(
            s.select(Some("hmac"), Algorithm::RS256).err(),
            Some(SelectError::UnknownKid)
        );
        assert_eq!(
            s.select(Some("enc"), Algorithm::RS256).err(),
            Some(SelectError::UnknownKid)
        );
    }

    #[test]
    fn weak_or_malformed_key_material_is_skipped() {
        let small = json!({"kty": "RSA", "kid": "small", "n": b64u(&[0xC5; 128]), "e": "AQAB"});
        let padded = json!({"kty": "RSA", "kid": "padded", "n": b64u(&[[0u8].as_slice(), &[0xC5; 256]].concat()), "e": "AQAB"});
        let short_ec = ec_jwk("short", "P-256", 31);
        let p521 = ec_jwk("p521", "P-521", 66);
        let bad_b64 = json!({"kty": "RSA", "kid": "b64", "n": "!!", "e": "AQAB"});
        let s = set(vec![small, padded, short_ec, p521, bad_b64]);
        assert_eq!(s.len(), 1);
        assert!(
            s.select(Some("padded"), Algorithm::PS256).is_ok(),
            "a leading zero byte is tolerated"
        );
    }

    #[test]
    fn key_type_and_curve_must_fit_the_algorithm() {
        let s = set(vec![
            rsa_jwk("r"),
            ec_jwk("p256", "P-256", 32),
            ec_jwk("p384", "P-384", 48),
        ]);
        assert!(s.select(Some("r"), Algorithm::RS256).is_ok());
        assert!(s.select(Some("r"), Algorithm::PS512).is_ok());
        assert_eq!(
            s.select(Some("r"), Algorithm::ES256).err(),
            Some(SelectError::Mismatch)
        );
        assert_eq!(
            s.select(Some("p256"), Algorithm::RS256).err(),
            Some(SelectError::Mismatch)
        );
        assert_eq!(
            s.select(Some("p256"), Algorithm::ES384).err(),
            Some(SelectError::Mismatch)
        );
        assert!(s.select(Some("p384"), Algorithm::ES384).is_ok());
        assert_eq!(
            s.select(Some("p384"), Algorithm::EdDSA).err(),
            Some(SelectError::Mismatch)
        );
    }

    #[test]
    fn jwk_alg_pins_the_key_to_one_algorithm() {
        let mut pinned = rsa_jwk("pinned");
        pinned["alg"] = "PS256".into();
        let mut wrong = rsa_jwk("wrong");
        wrong["alg"] = "ES256".into();
        let mut unknown = rsa_jwk("unknown");
        unknown["alg"] = "RSA-OAEP".into();
        let s = set(vec![pinned, wrong, unknown]);
        assert_eq!(s.len(), 1);
        assert!(s.select(Some("pinned"), Algorithm::PS256).is_ok());
        assert_eq!(
            s.select(Some("pinned"), Algorithm::RS256).err(),
            Some(SelectError::Mismatch)
        );
    }

    #[test]
    fn same_kid_on_two_key_types_selects_the_one_that_fits() {
        let s = set(vec![rsa_jwk("k"), ec_jwk("k", "P-256", 32)]);
        assert_eq!(
            s.select(Some("k"), Algorithm::ES256).expect("fits").ty,
            KeyType::P256
        );
        assert_eq!(
            s.select(Some("k"), Algorithm::RS256).expect("fits").ty,
            KeyType::Rsa
        );
    }

    #[test]
    fn token_without_kid_needs_exactly_one_key() {
        let one = set(vec![rsa_jwk("only")]);
        assert!(one.select(None, Algorithm::RS256).is_ok());
        assert_eq!(
            one.select(None, Algorithm::ES256).err(),
            Some(SelectError::Mismatch)
        );
        let two = set(vec![rsa_jwk("a"), rsa_jwk("bb")]);
        assert_eq!(
            two.select(None, Algorithm::RS256).err(),
            Some(SelectError::NoKid)
        );
    }

    #[test]
    fn duplicate_keys_count_once_and_the_set_is_bounded() {
        let s = set(vec![rsa_jwk("a"), rsa_jwk("a")]);
        assert_eq!(s.len(), 1);
        assert!(s.select(None, Algorithm::RS256).is_ok());
        let many: Vec<_> = (0..100)
            .map(|i| ec_jwk(&format!("k{i}"), "P-256", 32))
            .collect();
        let (s, skipped) = KeySet::from_document(&JwkSetDocument { keys: many });
        assert_eq!(s.len(), MAX_KEYS);
        assert_eq!(skipped.len(), 100 - MAX_KEYS);
    }

    #[test]
    fn losing_a_key_is_detected_adding_one_is_not() {
        let ab = set(vec![rsa_jwk("a"), rsa_jwk("bb")]);
        let abc = set(vec![rsa_jwk("a"), rsa_jwk("bb"), rsa_jwk("ccc")]);
        let b = set(vec![rsa_jwk("bb")]);
        assert!(!ab.loses_keys_in(&abc));
        assert!(abc.loses_keys_in(&b));
    }

    #[test]
    fn max_age_is_read_from_cache_control() {
        let h = |v: &[&str]| {
            let mut m = http::HeaderMap::new();
            for v in v {
                m.append(
                    http::header::CACHE_CONTROL,
                    http::HeaderValue::from_str(v).expect("header"),
                );
            }
            max_age(&m)
        };
        assert_eq!(h(&["public, max-age=600"]), Some(Duration::from_secs(600)));
        assert_eq!(h(&["Max-Age=\"60\""]), Some(Duration::from_secs(60)));
        assert_eq!(h(&["public", "max-age=7"]), Some(Duration::from_secs(7)));
        assert_eq!(h(&["max-age=600, no-cache"]), Some(Duration::ZERO));
        assert_eq!(h(&["max-age=abc"]), None);
        assert_eq!(h(&[]), None);
    }

    #[test]
    fn real_keys_verify_their_own_signatures_only() {
        let rng = SystemRandom::new();
        let pair = EcdsaKeyPair::generate(&sig::ECDSA_P256_SHA256_FIXED_SIGNING).expect("keygen");
        let point = pair.public_key().as_ref();
        let jwk = json!({"kty": "EC", "crv": "P-256", "kid": "ec", "x": b64u(&point[1..33]), "y": b64u(&point[33..])});
        let key = key_from_jwk(&jwk).expect("usable");
        let input = "eyJhbGciOiJFUzI1NiJ9.e30";
        let signature = b64u(pair.sign(&rng, input.as_bytes()).expect("sign").as_ref());
        let token = format!("{input}.{signature}");
        let good = jwt::split(&token).expect("three segments");
        assert!(key.verify(&good, Algorithm::ES256));
        assert!(
            !key.verify(&good, Algorithm::ES384),
            "wrong curve for the algorithm"
        );
        let tampered = format!("eyJhbGciOiJFUzI1NiJ9.e31.{signature}");
        assert!(!key.verify(&jwt::split(&tampered).expect("segments"), Algorithm::ES256));
    }

    /// A token with `header` and an empty claims set, signed by `sign`.
    fn signed(header: &str, sign: impl FnOnce(&[u8]) -> Vec<u8>) -> String {
        let input = format!("{}.e30", b64u(header.as_bytes()));
        let signature = b64u(&sign(input.as_bytes()));
        format!("{input}.{signature}")
    }

    #[test]
    fn rsa_keys_verify_with_or_without_a_padded_modulus() {
        let pair = sig::RsaKeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).expect("keygen");
        let c = sig::RsaPublicKeyComponents::<Vec<u8>>::from(pair.public_key());
        let token = signed(r#"{"alg":"RS256"}"#, |input| {
            let mut out = vec![0; pair.public_modulus_len()];
            pair.sign(
                &sig::RSA_PKCS1_SHA256,
                &SystemRandom::new(),
                input,
                &mut out,
            )
            .expect("sign");
            out
        });
        let segments = jwt::split(&token).expect("three segments");
        let plain = json!({"kty": "RSA", "kid": "r", "n": b64u(&c.n), "e": b64u(&c.e)});
        let padded_n = [[0u8].as_slice(), &c.n].concat();
        let padded = json!({"kty": "RSA", "kid": "r", "n": b64u(&padded_n), "e": b64u(&c.e)});
        for jwk in [&plain, &padded] {
            let key = key_from_jwk(jwk).expect("usable");
            assert!(key.verify(&segments, Algorithm::RS256), "{jwk}");
            assert!(!key.verify(&segments, Algorithm::PS256), "{jwk}");
        }
        assert_eq!(set(vec![plain, padded]).len(), 1, "the same key twice");
    }

    #[test]
    fn ed25519_keys_verify_eddsa_only() {
        let pair = sig::Ed25519KeyPair::generate().expect("keygen");
        let x = b64u(pair.public_key().as_ref());
        let token = signed(r#"{"alg":"EdDSA"}"#, |input| {
            pair.sign(input).as_ref().to_vec()
        });
        let segments = jwt::split(&token).expect("three segments");
        let key = key_from_jwk(&json!({"kty": "OKP", "crv": "Ed25519", "x": x})).expect("usable");
        assert_eq!(key.ty, KeyType::Ed25519);
        assert!(key.verify(&segments, Algorithm::EdDSA));
        assert!(!key.verify(&segments, Algorithm::ES256));
        for odd in [
            json!({"kty": "EC", "crv": "Ed25519", "x": x, "y": x}),
            json!({"kty": "OKP", "crv": "P-256", "x": x}),
            json!({"kty": "OKP", "crv": "Ed25519", "x": b64u(&[7; 31])}),
        ] {
            assert!(key_from_jwk(&odd).is_err(), "{odd}");
        }
    }

    #[test]
    fn odd_members_make_a_key_unusable_not_the_set() {
        let mut hmac_alg = rsa_jwk("hs");
        hmac_alg["alg"] = "HS256".into();
        let mut numeric_kid = rsa_jwk("n");
        numeric_kid["kid"] = json!(7);
        let mut no_exponent = rsa_jwk("e");
        no_exponent["e"] = "".into();
        let mut no_y = ec_jwk("y", "P-256", 32);
        no_y.as_object_mut().expect("object").remove("y");
        let uneven = json!({"kty": "EC", "kid": "u", "crv": "P-256", "x": b64u(&[1; 31]), "y": b64u(&[2; 33])});
        let (s, skipped) = KeySet::from_document(&JwkSetDocument {
            keys: vec![
                hmac_alg,
                numeric_kid,
                no_exponent,
                no_y,
                uneven,
                rsa_jwk("ok"),
            ],
        });
        assert_eq!((s.len(), skipped.len()), (1, 5), "{skipped:?}");
        assert!(s.select(Some("ok"), Algorithm::RS256).is_ok());
    }

    async fn counting_fetch(calls: &AtomicUsize, delay: Duration) -> Option<(KeySet, ())> {
        calls.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(delay).await;
        Some((set(vec![rsa_jwk("a")]), ()))
    }

    #[tokio::test(start_paused = true)]
    async fn unknown_kid_refetch_is_limited_to_one_per_interval() {
        let store = KeyStore::new(None, Duration::from_secs(10));
        let calls = AtomicUsize::new(0);
        assert!(
            store
                .refresh(counting_fetch(&calls, Duration::ZERO))
                .await
                .is_some()
        );
        let g = store.snapshot().expect("loaded").1;
        let r = store
            .refetch_for_unknown_kid(g, || counting_fetch(&calls, Duration::ZERO))
            .await;
        assert_eq!(r, Refetch::Fetched { lost_keys: false });
        for _ in 0..100 {
            let g = store.snapshot().expect("loaded").1;
            let r = store
                .refetch_for_unknown_kid(g, || counting_fetch(&calls, Duration::ZERO))
                .await;
            assert_eq!(r, Refetch::Limited);
        }
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        tokio::time::advance(Duration::from_secs(10)).await;
        let g = store.snapshot().expect("loaded").1;
        let r = store
            .refetch_for_unknown_kid(g, || counting_fetch(&calls, Duration::ZERO))
            .await;
        assert_eq!(r, Refetch::Fetched { lost_keys: false });
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_unknown_kids_wait_on_one_fetch() {
        let store = Arc::new(KeyStore::new(None, Duration::from_secs(10)));
        let calls = Arc::new(AtomicUsize::new(0));
        store
            .refresh(async { Some((set(vec![rsa_jwk("a")]), ())) })
            .await;
        let g = store.snapshot().expect("loaded").1;
        let mut tasks = Vec::new();
        for _ in 0..50 {
            let (store, calls) = (Arc::clone(&store), Arc::clone(&calls));
            tasks.push(tokio::spawn(async move {
                store
                    .refetch_for_unknown_kid(g, || async {
                        calls.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        Some((set(vec![rsa_jwk("a"), rsa_jwk("new")]), ()))
                    })
                    .await
            }));
        }
        let mut fetched = 0;
        for t in tasks {
            match t.await.expect("task") {
                Refetch::Fetched { .. } => fetched += 1,
                Refetch::Coalesced => {}
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!((fetched, calls.load(Ordering::SeqCst)), (1, 1));
        assert!(
            store
                .snapshot()
                .expect("loaded")
                .0
                .select(Some("new"), Algorithm::RS256)
                .is_ok()
        );
    }

    #[tokio::test]
    async fn failed_refresh_keeps_the_last_good_keys() {
        let store = KeyStore::new(None, Duration::from_secs(10));
        assert!(
            store
                .refresh(async { None::<(KeySet, ())> })
                .await
                .is_none()
        );
        assert!(store.snapshot().is_none());
        store
            .refresh(async { Some((set(vec![rsa_jwk("a")]), ())) })
            .await;
        assert!(
            store
                .refresh(async { None::<(KeySet, ())> })
                .await
                .is_none()
        );
        let g = store.snapshot().expect("kept").1;
        assert_eq!(
            store
                .refetch_for_unknown_kid(g, || async { None::<(KeySet, ())> })
                .await,
            Refetch::Failed
        );
        assert!(
            store
                .snapshot()
                .expect("kept")
                .0
                .select(Some("a"), Algorithm::RS256)
                .is_ok()
        );
        let lost = store
            .refresh(async { Some((set(vec![rsa_jwk("bb")]), ())) })
            .await;
        assert_eq!(lost, Some((true, ())));
    }
}
