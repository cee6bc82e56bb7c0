//! The validator as a whole, with keys installed in memory (no IdP).

use std::sync::LazyLock;

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::rsa::KeySize;
use aws_lc_rs::signature::{
    self as sig, EcdsaKeyPair, KeyPair, RsaKeyPair, RsaPublicKeyComponents,
};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Value, json};

use super::*;
use crate::config::{DEFAULT_ALGORITHMS, IdpTls};

pub(super) const ISSUER: &str = "https://idp.example.com/realms/mcp";

static RSA: LazyLock<RsaKeyPair> =
    LazyLock::new(|| RsaKeyPair::generate(KeySize::Rsa2048).expect("rsa keygen"));
static EC: LazyLock<EcdsaKeyPair> = LazyLock::new(|| {
    EcdsaKeyPair::generate(&sig::ECDSA_P256_SHA256_FIXED_SIGNING).expect("ec keygen")
});

pub(super) fn b64(bytes: impl AsRef<[u8]>) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

fn rsa_jwk(kid: &str) -> Value {
    let c = RsaPublicKeyComponents::<Vec<u8>>::from(RSA.public_key());
    json!({"kty": "RSA", "kid": kid, "use": "sig", "n": b64(&c.n), "e": b64(&c.e)})
}

fn ec_jwk(kid: &str) -> Value {
    let p = EC.public_key().as_ref();
    json!({"kty": "EC", "kid": kid, "crv": "P-256", "x": b64(&p[1..33]), "y": b64(&p[33..])})
}

/// Signs `header.claims` with the RSA key (RS256) or the EC key (ES256).
pub(super) fn mint(header: &Value, claims: &Value) -> String {
    let input = format!("{}.{}", b64(header.to_string()), b64(claims.to_string()));
    let rng = SystemRandom::new();
    let signature = if header["alg"] == "ES256" {
        EC.sign(&rng, input.as_bytes())
            .expect("sign")
            .as_ref()
            .to_vec()
    } else {
        let mut out = vec![0; RSA.public_modulus_len()];
        RSA.sign(&sig::RSA_PKCS1_SHA256, &rng, input.as_bytes(), &mut out)
            .expect("sign");
        out
    };
    format!("{input}.{}", b64(signature))
}

pub(super) fn now() -> i64 {
    unix_now()
}

pub(super) fn claims() -> Value {
    json!({"iss": ISSUER, "sub": "alice", "aud": "mcp-server", "exp": now() + 600, "iat": now(), "scope": "notes.read"})
}

pub(super) fn rs256() -> Value {
    json!({"alg": "RS256", "kid": "rsa-1", "typ": "at+jwt"})
}

pub(super) fn inbound(required_scopes: &[&str]) -> Inbound {
    Inbound {
        issuer: ISSUER.into(),
        discovery_url: None,
        jwks_uri: None,
        audiences: vec!["mcp-server".into()],
        algorithms: DEFAULT_ALGORITHMS
            .iter()
            .filter_map(|a| jwt::parse_alg(a))
            .collect(),
        leeway: Duration::from_secs(30),
        required_scopes: required_scopes.iter().map(|s| s.to_string()).collect(),
        max_token_bytes: 8192,
        introspection: None,
        public_paths: vec![],
        stream_lifetime: crate::config::StreamLifetime::Token,
    }
}

pub(super) fn validator_with(config: &Inbound, keys: Option<Vec<Value>>) -> Validator {
    let idp = IdpClient::new(&IdpTls {
        ca_file: None,
        allow_plain_http: false,
    })
    .expect("client");
    let v = Validator::new(config, idp, Arc::default(), Arc::default());
    if let Some(keys) = keys {
        let (set, _) = KeySet::from_document(&JwkSetDocument { keys });
        futures_util::FutureExt::now_or_never(v.refresh_keys(async { Some((set, None)) }))
            .expect("no wait");
    }
    v
}

pub(super) fn validator() -> Validator {
    validator_with(&inbound(&[]), Some(vec![rsa_jwk("rsa-1"), ec_jwk("ec-1")]))
}

fn reason(r: Result<Principal, InboundError>) -> (RejectReason, &'static str) {
    match r {
        Err(InboundError::Rejected {
            reason,
            description,
        }) => (reason, description),
        other => panic!("expected a rejection, got {other:?}"),
    }
}

#[tokio::test]
async fn valid_rs256_and_es256_tokens_are_accepted() {
    let v = validator();
    let p = v
        .validate(&mint(&rs256(), &claims()))
        .await
        .expect("rs256 valid");
    assert_eq!(p.sub.as_deref(), Some("alice"));
    let es = json!({"alg": "ES256", "kid": "ec-1"});
    assert!(v.validate(&mint(&es, &claims())).await.is_ok());
}

#[tokio::test(start_paused = true)]
async fn a_token_seen_again_is_served_from_the_cache() {
    let v = validator();
    let token = mint(&rs256(), &claims());
    let first = v.validate(&token).await.expect("valid");
    assert!(
        v.cache
            .get(&cache::digest(&token), unix_now())
            .await
            .is_some(),
        "the acceptance is remembered under the token's digest"
    );
    // A second validation a second later: a fresh one would be trusted a second longer; the
    // remembered one is the same acceptance.
    tokio::time::advance(Duration::from_secs(1)).await;
    let again = v.validate(&token).await.expect("valid");
    assert_eq!(again.trusted_until, first.trusted_until);
    // Another token is validated afresh: its acceptance ends later.
    let mut other = claims();
    other["sub"] = json!("bob");
    let other = v.validate(&mint(&rs256(), &other)).await.expect("valid");
    assert!(other.trusted_until > first.trusted_until);
}

#[tokio::test]
async fn withdrawn_key_clears_cached_decisions() {
    let v = validator();
    let token = mint(&rs256(), &claims());
    v.validate(&token).await.expect("valid");
    let (set, _) = KeySet::from_document(&JwkSetDocument {
        keys: vec![ec_jwk("ec-1")],
    });
    v.refresh_keys(async { Some((set, None)) })
        .await
        .expect("installed");
    assert_eq!(reason(v.validate(&token).await).0, RejectReason::UnknownKey);
}

#[tokio::test]
async fn acceptances_carry_their_trust_and_key_epoch() {
    let v = validator();
    let before = tokio::time::Instant::now();
    let p = v.validate(&mint(&rs256(), &claims())).await.expect("valid");
    assert_eq!(p.key_epoch, 0);
    // exp in 600 s (+30 s leeway) is capped by the 300 s a validation is remembered.
    let until = p.trusted_until.expect("trusted for a while");
    assert!(until >= before + DEFAULT_VALIDATED_TTL, "{until:?}");
    assert!(until <= tokio::time::Instant::now() + DEFAULT_VALIDATED_TTL);
    assert!(p.trusted(before, 0));
    assert!(!p.trusted(before, 1), "another epoch");
    assert!(!p.trusted(until, 0), "lapsed");

    let mut c = claims();
    c["exp"] = json!(now() + 10);
    let short = v.validate(&mint(&rs256(), &c)).await.expect("valid");
    let until = short.trusted_until.expect("trusted");
    assert!(
        until <= tokio::time::Instant::now() + Duration::from_secs(41),
        "exp + leeway bounds the trust: {until:?}"
    );
}

#[tokio::test]
async fn a_withdrawn_key_starts_a_new_key_epoch() {
    let v = validator();
    assert_eq!(v.key_epoch(), 0);
    let (same, _) = KeySet::from_document(&JwkSetDocument {
        keys: vec![rsa_jwk("rsa-1"), ec_jwk("ec-1")],
    });
    v.refresh_keys(async { Some((same, None)) }).await;
    assert_eq!(v.key_epoch(), 0, "nothing withdrawn");
    let (fewer, _) = KeySet::from_document(&JwkSetDocument {
        keys: vec![rsa_jwk("rsa-1")],
    });
    v.refresh_keys(async { Some((fewer, None)) }).await;
    assert_eq!(v.key_epoch(), 1);
    let p = v
        .validate(&mint(&rs256(), &claims()))
        .await
        .expect("rsa-1 is still published");
    assert_eq!(p.key_epoch, 1);
}

#[tokio::test]
async fn a_decision_from_an_older_key_epoch_is_not_served() {
    let v = validator();
    let token = mint(&rs256(), &claims());
    let old = v.validate(&token).await.expect("valid");
    v.forget_decisions();
    // As if a validation that began before the withdrawal finished after it.
    v.cache
        .insert(
            cache::digest(&token),
            Ok(old.clone()),
            Duration::from_secs(60),
        )
        .await;
    // Validated again rather than served: the acceptance is of the current epoch.
    let again = v.validate(&token).await.expect("still valid");
    assert_eq!(old.key_epoch, 0);
    assert_eq!(again.key_epoch, v.key_epoch());
    assert_ne!(again.key_epoch, old.key_epoch);
}

/// A validator as exchange mode builds it (accepted JWTs not remembered), with the RSA key.
async fn exchange_mode_validator() -> Validator {
    let idp = IdpClient::new(&IdpTls {
        ca_file: None,
        allow_plain_http: false,
    })
    .expect("client");
    let timing = Timing {
        remember_accepted: false,
        ..Timing::default()
    };
    let v = Validator::with_timing(&inbound(&[]), idp, Arc::default(), Arc::default(), timing);
    let (set, _) = KeySet::from_document(&JwkSetDocument {
        keys: vec![rsa_jwk("rsa-1")],
    });
    v.refresh_keys(async { Some((set, None)) }).await;
    v
}

#[tokio::test]
async fn without_remember_accepted_only_refusals_are_remembered() {
    let v = exchange_mode_validator().await;
    let good = mint(&rs256(), &claims());
    let p = v.validate(&good).await.expect("valid");
    assert!(
        p.trusted_until.is_some(),
        "the acceptance still says how long it holds"
    );
    let mut c = claims();
    c["aud"] = json!("someone-else");
    let wrong = mint(&rs256(), &c);
    assert_eq!(reason(v.validate(&wrong).await).0, RejectReason::Audience);
    v.cache.run_pending_tasks().await;
    assert_eq!(v.cache.len(), 1, "only the refusal");
    assert!(v.cache.get(&cache::digest(&good), now()).await.is_none());
}

#[tokio::test]
async fn an_acceptance_is_remembered_on_request_unless_its_epoch_has_passed() {
    let v = exchange_mode_validator().await;
    let token = mint(&rs256(), &claims());
    let p = v.validate(&token).await.expect("valid");
    assert!(v.cache.get(&cache::digest(&token), now()).await.is_none());
    v.remember(&token, &p).await;
    assert_eq!(
        v.cache.get(&cache::digest(&token), now()).await,
        Some(Ok(p.clone()))
    );

    let other = mint(&rs256(), &claims());
    let q = v.validate(&other).await.expect("valid");
    v.forget_decisions();
    v.remember(&other, &q).await;
    v.cache.run_pending_tasks().await;
    assert_eq!(
        v.cache.len(),
        0,
        "an acceptance from before a withdrawal is not kept"
    );
}

#[tokio::test]
async fn expired_token_is_refused_and_not_cached() {
    let v = validator();
    let mut c = claims();
    c["exp"] = json!(now() - 31);
    let token = mint(&rs256(), &c);
    assert_eq!(
        reason(v.validate(&token).await),
        (RejectReason::Expired, "token expired")
    );
    v.cache.run_pending_tasks().await;
    assert_eq!(v.cache.len(), 0);
}

#[tokio::test]
async fn wrong_audience_is_remembered() {
    let v = validator();
    let mut c = claims();
    c["aud"] = json!("someone-else");
    let token = mint(&rs256(), &c);
    assert_eq!(reason(v.validate(&token).await).0, RejectReason::Audience);
    let remembered = v.cache.get(&cache::digest(&token), unix_now()).await;
    assert!(
        matches!(
            remembered,
            Some(Err(InboundError::Rejected {
                reason: RejectReason::Audience,
                ..
            }))
        ),
        "{remembered:?}"
    );
    assert_eq!(
        reason(v.validate(&token).await).0,
        RejectReason::Audience,
        "from the cache"
    );
}

#[tokio::test]
async fn header_rules_refuse_before_any_key_is_used() {
    let v = validator();
    let cases: Vec<(Value, RejectReason)> = vec![
        (
            json!({"alg": "none", "kid": "rsa-1"}),
            RejectReason::Algorithm,
        ),
        (
            json!({"alg": "HS256", "kid": "rsa-1"}),
            RejectReason::Algorithm,
        ),
        (
            json!({"alg": "RS256", "kid": "rsa-1", "jku": "https://evil/jwks"}),
            RejectReason::Malformed,
        ),
        (
            json!({"alg": "RS256", "kid": "rsa-1", "x5u": "https://evil/cert"}),
            RejectReason::Malformed,
        ),
        (
            json!({"alg": "RS256", "kid": "rsa-1", "jwk": rsa_jwk("x")}),
            RejectReason::Malformed,
        ),
        (
            json!({"alg": "RS256", "kid": "rsa-1", "crit": ["exp"], "exp": 1}),
            RejectReason::Malformed,
        ),
        (
            json!({"alg": "RS256", "kid": "rsa-1", "typ": "dpop+jwt"}),
            RejectReason::Malformed,
        ),
        (
            json!({"alg": "RS256", "kid": "ec-1"}),
            RejectReason::Algorithm,
        ),
        (json!({"alg": "RS256"}), RejectReason::UnknownKey),
    ];
    for (header, want) in cases {
        let got = reason(v.validate(&mint(&header, &claims())).await).0;
        assert_eq!(got, want, "{header}");
    }
}

#[tokio::test]
async fn algorithm_outside_the_configured_list_is_refused() {
    let mut config = inbound(&[]);
    config.algorithms = vec![Algorithm::ES256];
    let v = validator_with(&config, Some(vec![rsa_jwk("rsa-1"), ec_jwk("ec-1")]));
    assert_eq!(
        reason(v.validate(&mint(&rs256(), &claims())).await).0,
        RejectReason::Algorithm
    );
}

#[tokio::test]
async fn hmac_in_the_configuration_is_ignored() {
    let mut config = inbound(&[]);
    config.algorithms.push(Algorithm::HS256);
    let v = validator_with(&config, Some(vec![rsa_jwk("rsa-1")]));
    assert!(!v.algorithms.contains(&Algorithm::HS256));
}

#[tokio::test]
async fn tampered_payload_fails_the_signature() {
    let v = validator();
    let token = mint(&rs256(), &claims());
    let mut parts: Vec<String> = token.split('.').map(String::from).collect();
    let mut c = claims();
    c["sub"] = json!("mallory");
    parts[1] = b64(c.to_string());
    assert_eq!(
        reason(v.validate(&parts.join(".")).await),
        (RejectReason::Signature, "invalid signature")
    );
}

#[tokio::test]
async fn token_without_kid_is_verified_when_the_set_has_one_key() {
    let v = validator_with(&inbound(&[]), Some(vec![rsa_jwk("rsa-1")]));
    assert!(
        v.validate(&mint(&json!({"alg": "RS256"}), &claims()))
            .await
            .is_ok()
    );
}

#[tokio::test]
async fn unknown_kid_is_refused_when_no_refetch_helps() {
    let v = validator();
    let token = mint(&json!({"alg": "RS256", "kid": "nope"}), &claims());
    assert_eq!(
        reason(v.validate(&token).await),
        (RejectReason::UnknownKey, "unknown signing key")
    );
}

#[tokio::test]
async fn before_the_first_jwks_load_validation_is_unavailable() {
    let v = validator_with(&inbound(&[]), None);
    assert_eq!(
        v.validate(&mint(&rs256(), &claims())).await,
        Err(InboundError::Unavailable)
    );
}

#[tokio::test]
async fn missing_scope_is_403_naming_the_required_scopes() {
    let v = validator_with(
        &inbound(&["notes.read", "notes.write"]),
        Some(vec![rsa_jwk("rsa-1")]),
    );
    assert_eq!(
        v.validate(&mint(&rs256(), &claims())).await,
        Err(InboundError::InsufficientScope {
            scope: "notes.read notes.write".into()
        })
    );
}

#[tokio::test]
async fn structural_garbage_is_malformed() {
    let v = validator();
    let good = mint(&rs256(), &claims());
    let (h, rest) = good.split_once('.').expect("dot");
    let cases = [
        String::new(),
        "opaque-token".to_owned(),
        "a.b".to_owned(),
        "a.b.c.d".to_owned(),
        format!("{h}.{rest}.x"),
        format!("{h}+.{rest}"),
        format!("{h}.{rest}=="),
        format!("{}.{rest}", b64("{\"alg\":\"RS256\"")),
        "é.é.é".to_owned(),
        format!("{h}..{}", rest.rsplit_once('.').expect("dot").1),
    ];
    for token in cases {
        assert_eq!(
            reason(v.validate(&token).await).0,
            RejectReason::Malformed,
            "{token}"
        );
    }
}

#[tokio::test]
async fn oversized_token_is_too_large() {
    let v = validator();
    assert_eq!(
        reason(v.validate(&"a".repeat(8193)).await),
        (RejectReason::TooLarge, "token too large")
    );
}

#[tokio::test]
async fn readiness_names_discovery_and_jwks_until_loaded() {
    let readiness = Arc::new(Readiness::default());
    let idp = IdpClient::new(&IdpTls {
        ca_file: None,
        allow_plain_http: false,
    })
    .expect("client");
    let _v = Validator::new(
        &inbound(&[]),
        idp.clone(),
        Arc::default(),
        Arc::clone(&readiness),
    );
    assert_eq!(readiness.check(), Err("pending: discovery, jwks".into()));
    let readiness = Arc::new(Readiness::default());
    let mut config = inbound(&[]);
    config.jwks_uri = Some(url::Url::parse("https://idp.example.com/jwks").expect("url"));
    let _v = Validator::new(&config, idp, Arc::default(), Arc::clone(&readiness));
    assert_eq!(readiness.check(), Err("pending: jwks".into()));
}

#[test]
fn refresh_interval_honours_max_age_within_bounds() {
    let t = Timing::default();
    assert_eq!(t.refresh_interval(None), DEFAULT_JWKS_REFRESH);
    assert_eq!(
        t.refresh_interval(Some(Duration::from_secs(600))),
        Duration::from_secs(600)
    );
    assert_eq!(t.refresh_interval(Some(Duration::ZERO)), MIN_JWKS_REFRESH);
    assert_eq!(
        t.refresh_interval(Some(Duration::from_secs(10_000_000))),
        MAX_JWKS_REFRESH
    );
}

#[test]
fn backoff_doubles_to_its_cap_and_resets() {
    let mut b = Backoff::new(Duration::from_millis(500), Duration::from_secs(3));
    let delays: Vec<u128> = (0..5).map(|_| b.next_delay().as_millis()).collect();
    assert_eq!(delays, vec![500, 1000, 2000, 3000, 3000]);
    b.reset();
    assert_eq!(b.next_delay(), Duration::from_millis(500));
}
