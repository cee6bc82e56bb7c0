//! Inbound token validation end to end: hostile tokens, key rotation, a flood of unknown
//! `kid`s, a JWKS that is down at start, passthrough, introspection. The issuer and the
//! backend are in-process on 127.0.0.1:0; the proxy runs in-process from YAML.

use std::net::SocketAddr;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Value, json};

use crate::support::issuer::{self, Issuer, Key, b64, hs256, unsigned};
use crate::support::{self, Echo, client, eventually, metric};

const AUDIENCE: &str = "mcp-server";
const SCOPE: &str = "notes.read";

/// A passthrough proxy in front of `echo`, trusting `issuer`, requiring `notes.read`.
fn yaml(issuer: &Issuer, echo: &Echo, extra_inbound: &str) -> String {
    format!(
        "mode: passthrough\nupstream: {{url: '{}'}}\ninbound: {{issuer: '{}', audiences: [{AUDIENCE}], required_scopes: [{SCOPE}]{extra_inbound}}}\n",
        echo.url(),
        issuer.url()
    )
}

/// Waits until `/readyz` answers 200.
async fn ready(admin: SocketAddr) -> bool {
    eventually(Duration::from_secs(15), async || {
        let r = client().get(format!("http://{admin}/readyz")).send().await;
        r.is_ok_and(|r| r.status() == 200)
    })
    .await
}

/// One request through the proxy: status, `WWW-Authenticate`, body.
async fn call(proxy: SocketAddr, token: &str) -> (u16, String, Value) {
    call_with(&client(), proxy, token).await
}

/// [`call`] on a given client (reusing its connections).
async fn call_with(
    client: &reqwest::Client,
    proxy: SocketAddr,
    token: &str,
) -> (u16, String, Value) {
    let resp = client
        .get(format!("http://{proxy}/mcp"))
        .header("authorization", format!("Bearer {token}"))
        .send()
        .await
        .expect("request");
    let status = resp.status().as_u16();
    let challenge = resp
        .headers()
        .get("www-authenticate")
        .map(|v| v.to_str().expect("ascii").to_owned())
        .unwrap_or_default();
    let body = resp.json().await.unwrap_or(Value::Null);
    (status, challenge, body)
}

async fn rejections(admin: SocketAddr, reason: &str) -> f64 {
    metric(
        admin,
        &format!("txp_token_rejections_total{{reason=\"{reason}\"}}"),
    )
    .await
    .expect("rejection metric")
}

/// Everything a validation test needs: issuer with keys, backend, running proxy.
struct Setup {
    issuer: Issuer,
    echo: Echo,
    proxy: token_exchange_proxy::server::Running,
    rsa: Key,
    ec: Key,
}

async fn setup() -> Setup {
    let issuer = Issuer::start().await;
    let (rsa, ec) = (Key::rsa("rsa-1"), Key::ec("ec-1"));
    issuer.publish(&[&rsa, &ec]);
    let echo = support::echo().await;
    let proxy = support::proxy(&yaml(&issuer, &echo, "")).await;
    assert!(ready(proxy.admin_addr).await, "proxy never became ready");
    Setup {
        issuer,
        echo,
        proxy,
        rsa,
        ec,
    }
}

/// One hostile token and what the proxy must answer.
struct Case {
    name: &'static str,
    token: String,
    status: u16,
    reason: &'static str,
    description: &'static str,
}

fn case(
    name: &'static str,
    token: String,
    reason: &'static str,
    description: &'static str,
) -> Case {
    let status = if reason == "scope" { 403 } else { 401 };
    Case {
        name,
        token,
        status,
        reason,
        description,
    }
}

fn with(mut claims: Value, key: &str, value: Value) -> Value {
    claims[key] = value;
    claims
}

fn without(mut claims: Value, key: &str) -> Value {
    claims.as_object_mut().expect("object").remove(key);
    claims
}

fn hostile_tokens(s: &Setup) -> Vec<Case> {
    let (rsa, ec, iss) = (&s.rsa, &s.ec, &s.issuer);
    let good = || iss.claims(AUDIENCE, SCOPE);
    let h = || rsa.header();
    let attacker = Key::rsa("attacker");
    let attacker_ec = Key::ec("ec-1");
    let valid = rsa.sign(&h(), &good());
    let (vh, vp, vs) = {
        let p: Vec<&str> = valid.split('.').collect();
        (p[0].to_owned(), p[1].to_owned(), p[2].to_owned())
    };
    let sig_bytes = URL_SAFE_NO_PAD.decode(&vs).expect("signature");
    let now = issuer::now();
    let nested = format!(
        r#"{{"iss":"{}","aud":"{AUDIENCE}","exp":{},"scope":"{SCOPE}","x":{}1{}}}"#,
        iss.url(),
        now + 600,
        "[".repeat(300),
        "]".repeat(300)
    );
    let mut tampered_claims = good();
    tampered_claims["sub"] = json!("admin");

    vec![
        // Algorithm attacks.
        case(
            "alg none, no signature",
            unsigned(&json!({"alg": "none", "kid": "rsa-1"}), &good()),
            "algorithm",
            "algorithm not allowed",
        ),
        case(
            "alg none with a real signature appended",
            format!(
                "{}.{vp}.{vs}",
                b64(json!({"alg": "none", "kid": "rsa-1"}).to_string())
            ),
            "algorithm",
            "algorithm not allowed",
        ),
        case(
            "alg NONE",
            unsigned(&json!({"alg": "NONE"}), &good()),
            "algorithm",
            "algorithm not allowed",
        ),
        case(
            "HS256 keyed with the RSA public key PEM",
            hs256(
                rsa.public_pem().as_bytes(),
                &json!({"alg": "HS256", "kid": "rsa-1"}),
                &good(),
            ),
            "algorithm",
            "algorithm not allowed",
        ),
        case(
            "HS256 keyed with the RSA public key DER",
            hs256(
                &rsa.public_der,
                &json!({"alg": "HS256", "kid": "rsa-1"}),
                &good(),
            ),
            "algorithm",
            "algorithm not allowed",
        ),
        case(
            "HS256 keyed with the EC public key DER",
            hs256(
                &ec.public_der,
                &json!({"alg": "HS256", "kid": "ec-1"}),
                &good(),
            ),
            "algorithm",
            "algorithm not allowed",
        ),
        case(
            "RS256 header over the EC key's kid",
            rsa.sign(&json!({"alg": "RS256", "kid": "ec-1"}), &good()),
            "algorithm",
            "algorithm does not match the key",
        ),
        case(
            "ES256 header over the RSA key's kid",
            ec.sign(&json!({"alg": "ES256", "kid": "rsa-1"}), &good()),
            "algorithm",
            "algorithm does not match the key",
        ),
        case(
            "PS256 header over an RS256 signature",
            rsa.sign(&json!({"alg": "PS256", "kid": "rsa-1"}), &good()),
            "signature",
            "invalid signature",
        ),
        // Keys the token brings along, or that the issuer never published.
        case(
            "unknown kid",
            rsa.sign(&json!({"alg": "RS256", "kid": "nobody"}), &good()),
            "unknown_key",
            "unknown signing key",
        ),
        case(
            "no kid with two published keys",
            rsa.sign(&json!({"alg": "RS256"}), &good()),
            "unknown_key",
            "token has no key id",
        ),
        case(
            "jku to the attacker's JWKS",
            attacker.sign(
                &json!({"alg": "RS256", "kid": "attacker", "jku": "http://127.0.0.1:9/jwks"}),
                &good(),
            ),
            "malformed",
            "token header names its own key",
        ),
        case(
            "jku with the issuer's kid",
            attacker.sign(
                &json!({"alg": "RS256", "kid": "rsa-1", "jku": "http://127.0.0.1:9/jwks"}),
                &good(),
            ),
            "malformed",
            "token header names its own key",
        ),
        case(
            "x5u to the attacker's certificate",
            attacker.sign(
                &json!({"alg": "RS256", "kid": "attacker", "x5u": "http://127.0.0.1:9/cert.pem"}),
                &good(),
            ),
            "malformed",
            "token header names its own key",
        ),
        case(
            "embedded jwk of the attacker",
            attacker.sign(
                &json!({"alg": "RS256", "kid": "rsa-1", "jwk": attacker.jwk()}),
                &good(),
            ),
            "malformed",
            "token header names its own key",
        ),
        case(
            "x5c is never read: attacker signs with the issuer's kid",
            attacker.sign(
                &json!({"alg": "RS256", "kid": "rsa-1", "x5c": [b64(&attacker.public_der)]}),
                &good(),
            ),
            "signature",
            "invalid signature",
        ),
        case(
            "attacker's RSA key, issuer's kid",
            attacker.sign(&h(), &good()),
            "signature",
            "invalid signature",
        ),
        case(
            "attacker's EC key, issuer's EC kid",
            attacker_ec.sign(&json!({"alg": "ES256", "kid": "ec-1"}), &good()),
            "signature",
            "invalid signature",
        ),
        case(
            "valid signature over a tampered payload",
            format!("{vh}.{}.{vs}", b64(tampered_claims.to_string())),
            "signature",
            "invalid signature",
        ),
        case(
            "truncated signature",
            format!("{vh}.{vp}.{}", b64(&sig_bytes[..sig_bytes.len() - 8])),
            "signature",
            "invalid signature",
        ),
        // Lifetime.
        case(
            "expired beyond leeway",
            rsa.sign(&h(), &with(good(), "exp", json!(now - 120))),
            "expired",
            "token expired",
        ),
        case(
            "nbf in the future",
            rsa.sign(&h(), &with(good(), "nbf", json!(now + 600))),
            "not_yet_valid",
            "token not yet valid",
        ),
        case(
            "iat in the future",
            rsa.sign(&h(), &with(good(), "iat", json!(now + 600))),
            "not_yet_valid",
            "token issued in the future",
        ),
        case(
            "no exp",
            rsa.sign(&h(), &without(good(), "exp")),
            "malformed",
            "token has no expiry",
        ),
        case(
            "exp as a string",
            rsa.sign(&h(), &with(good(), "exp", json!((now + 600).to_string()))),
            "malformed",
            "malformed token",
        ),
        // Issuer and audience.
        case(
            "iss with a trailing slash",
            rsa.sign(&h(), &with(good(), "iss", json!(format!("{}/", iss.url())))),
            "issuer",
            "wrong issuer",
        ),
        case(
            "iss of another issuer",
            rsa.sign(&h(), &with(good(), "iss", json!("https://evil.example"))),
            "issuer",
            "wrong issuer",
        ),
        case(
            "no iss",
            rsa.sign(&h(), &without(good(), "iss")),
            "issuer",
            "wrong issuer",
        ),
        case(
            "aud empty array",
            rsa.sign(&h(), &with(good(), "aud", json!([]))),
            "audience",
            "wrong audience",
        ),
        case(
            "aud wrong",
            rsa.sign(&h(), &with(good(), "aud", json!(["other-api"]))),
            "audience",
            "wrong audience",
        ),
        case(
            "aud missing",
            rsa.sign(&h(), &without(good(), "aud")),
            "audience",
            "wrong audience",
        ),
        // Header rules.
        case(
            "crit with an unknown extension",
            rsa.sign(
                &json!({"alg": "RS256", "kid": "rsa-1", "crit": ["x-custom"], "x-custom": true}),
                &good(),
            ),
            "malformed",
            "unsupported critical header",
        ),
        case(
            "typ of a DPoP proof",
            rsa.sign(
                &json!({"alg": "RS256", "kid": "rsa-1", "typ": "dpop+jwt"}),
                &good(),
            ),
            "malformed",
            "token type not accepted",
        ),
        case(
            "duplicate alg member",
            rsa.sign_texts(
                r#"{"alg":"RS256","kid":"rsa-1","alg":"none"}"#,
                &good().to_string(),
            ),
            "malformed",
            "malformed token",
        ),
        // Structure.
        case(
            "non-base64url header (+ and /)",
            format!("{}+/.{vp}.{vs}", &vh[..vh.len() - 2]),
            "malformed",
            "malformed token",
        ),
        case(
            "padded signature",
            format!("{vh}.{vp}.{vs}=="),
            "malformed",
            "malformed token",
        ),
        case(
            // Checked before anything else about the token is looked at or remembered.
            "characters outside b64token",
            format!("{vh}.{vp}.{vs}!"),
            "malformed",
            "malformed token",
        ),
        case(
            "two segments",
            format!("{vh}.{vp}"),
            "malformed",
            "token is not a JWT",
        ),
        case(
            "four segments",
            format!("{valid}.{vs}"),
            "malformed",
            "token is not a JWT",
        ),
        case(
            "header is not JSON",
            format!("{}.{vp}.{vs}", b64("not json")),
            "malformed",
            "malformed token",
        ),
        case(
            "claims are an array",
            rsa.sign_texts(&h().to_string(), "[1,2,3]"),
            "malformed",
            "malformed token",
        ),
        case(
            "deeply nested claims",
            rsa.sign_texts(&h().to_string(), &nested),
            "malformed",
            "malformed token",
        ),
        case(
            "9 KiB token",
            format!("{vh}.{}.{vs}", "A".repeat(9 * 1024)),
            "too_large",
            "token too large",
        ),
        // Scope: valid token, 403.
        case(
            "missing required scope",
            rsa.sign(&h(), &with(good(), "scope", json!("notes.write"))),
            "scope",
            "",
        ),
    ]
}

#[tokio::test]
async fn hostile_tokens_are_refused_before_the_backend() {
    let s = setup().await;
    let (proxy, admin) = (s.proxy.addr, s.proxy.admin_addr);
    let client = client();

    // A good token passes, so the refusals below are not an artefact of a broken setup.
    let good = s
        .rsa
        .sign(&s.rsa.header(), &s.issuer.claims(AUDIENCE, SCOPE));
    assert_eq!(call(proxy, &good).await.0, 200);
    let baseline = s.echo.requests();
    assert_eq!(baseline, 1);

    let cases = hostile_tokens(&s);
    assert!(cases.len() >= 30, "{} cases", cases.len());
    for c in cases {
        let before = rejections(admin, c.reason).await;
        let (status, challenge, body) = call_with(&client, proxy, &c.token).await;
        assert_eq!(status, c.status, "{}: status", c.name);
        assert_eq!(
            rejections(admin, c.reason).await,
            before + 1.0,
            "{}: reason {}",
            c.name,
            c.reason
        );
        if c.status == 401 {
            assert!(
                challenge.contains("error=\"invalid_token\""),
                "{}: {challenge}",
                c.name
            );
            let described = format!("error_description=\"{}\"", c.description);
            assert!(challenge.contains(&described), "{}: {challenge}", c.name);
            assert_eq!(body["error_description"], c.description, "{}", c.name);
        } else {
            assert!(
                challenge.contains("error=\"insufficient_scope\""),
                "{}: {challenge}",
                c.name
            );
            assert!(
                challenge.contains(&format!("scope=\"{SCOPE}\"")),
                "{}: {challenge}",
                c.name
            );
        }
        assert_eq!(
            s.echo.requests(),
            baseline,
            "{}: reached the backend",
            c.name
        );
    }
}

#[tokio::test]
async fn a_megabyte_token_never_reaches_the_backend() {
    let s = setup().await;
    let huge = format!(
        "{}.{}.{}",
        "A".repeat(16),
        "B".repeat(1024 * 1024),
        "C".repeat(16)
    );
    let resp = client()
        .get(format!("http://{}/mcp", s.proxy.addr))
        .header("authorization", format!("Bearer {huge}"))
        .send()
        .await;
    // hyper refuses a head this large itself (431 Request Header Fields Too Large) before the
    // request path runs; a client still writing may instead see the connection close. Either
    // way nothing is forwarded. (Tokens above `max_token_bytes` but within hyper's limit are
    // the `9 KiB token` row of the hostile table: 401 `too_large`.)
    if let Ok(r) = resp {
        assert_eq!(r.status(), 431);
    }
    assert_eq!(s.echo.requests(), 0);
}

#[tokio::test]
async fn issuer_comparison_keeps_a_configured_trailing_slash() {
    // `jwks_uri` configured: no discovery, and the issuer may differ from the discovery URL.
    let issuer = Issuer::start().await;
    let key = Key::ec("ec-1");
    issuer.publish(&[&key]);
    let echo = support::echo().await;
    let configured = format!("{}/realms/mcp/", issuer.url());
    let proxy = support::proxy(&format!(
        "mode: passthrough\nupstream: {{url: '{}'}}\ninbound: {{issuer: '{configured}', jwks_uri: '{}', audiences: [{AUDIENCE}]}}\n",
        echo.url(),
        issuer.jwks_uri()
    ))
    .await;
    assert!(ready(proxy.admin_addr).await);
    assert_eq!(issuer.discovery_fetches(), 0);
    let claims = |iss: &str| with(issuer.claims(AUDIENCE, ""), "iss", json!(iss));
    assert_eq!(
        call(proxy.addr, &key.sign(&key.header(), &claims(&configured)))
            .await
            .0,
        200
    );
    let without_slash = configured.trim_end_matches('/');
    let (status, challenge, _) =
        call(proxy.addr, &key.sign(&key.header(), &claims(without_slash))).await;
    assert_eq!(status, 401);
    assert!(challenge.contains("wrong issuer"), "{challenge}");
    assert_eq!(echo.requests(), 1);
}

#[tokio::test]
async fn rotated_key_is_accepted_after_one_refetch_and_the_old_key_keeps_working() {
    let s = setup().await;
    let proxy = s.proxy.addr;
    let old_token = s
        .rsa
        .sign(&s.rsa.header(), &s.issuer.claims(AUDIENCE, SCOPE));
    assert_eq!(call(proxy, &old_token).await.0, 200);
    let fetches = s.issuer.jwks_fetches();

    // The issuer adds a new key and signs with it from now on.
    let new = Key::rsa("rsa-2");
    s.issuer.publish(&[&s.rsa, &s.ec, &new]);
    let new_token = new.sign(&new.header(), &s.issuer.claims(AUDIENCE, SCOPE));
    assert_eq!(
        call(proxy, &new_token).await.0,
        200,
        "first token of the new key"
    );
    assert_eq!(s.issuer.jwks_fetches(), fetches + 1, "exactly one refetch");

    // More tokens of both keys: no further fetches.
    for _ in 0..5 {
        let t = new.sign(&new.header(), &s.issuer.claims(AUDIENCE, SCOPE));
        assert_eq!(call(proxy, &t).await.0, 200);
        let t = s
            .rsa
            .sign(&s.rsa.header(), &s.issuer.claims(AUDIENCE, SCOPE));
        assert_eq!(call(proxy, &t).await.0, 200, "old key, still published");
    }
    assert_eq!(call(proxy, &old_token).await.0, 200);
    assert_eq!(s.issuer.jwks_fetches(), fetches + 1);
    assert_eq!(s.echo.requests(), 13);
}

#[tokio::test]
async fn a_flood_of_unknown_kids_costs_the_issuer_at_most_a_few_fetches() {
    let s = setup().await;
    let (proxy, admin) = (s.proxy.addr, s.proxy.admin_addr);
    let fetches = s.issuer.jwks_fetches();
    let before = rejections(admin, "unknown_key").await;
    let claims = s.issuer.claims(AUDIENCE, SCOPE);
    let tokens: Vec<String> = (0..1000)
        .map(|_| {
            s.rsa.sign(
                &json!({"alg": "RS256", "kid": format!("{:016x}", issuer::rand_u64())}),
                &claims,
            )
        })
        .collect();
    let started = std::time::Instant::now();
    // 50 concurrent clients, 20 requests each.
    let mut tasks = Vec::new();
    for chunk in tokens.chunks(20) {
        let chunk = chunk.to_vec();
        tasks.push(tokio::spawn(async move {
            let client = client();
            let mut statuses = Vec::new();
            for t in chunk {
                statuses.push(call_with(&client, proxy, &t).await.0);
            }
            statuses
        }));
    }
    for t in tasks {
        assert!(t.await.expect("task").iter().all(|s| *s == 401));
    }
    let elapsed = started.elapsed();
    let extra = s.issuer.jwks_fetches() - fetches;
    println!("1000 random kids in {elapsed:?}: {extra} JWKS fetch(es)");
    // One refetch per 10 s window at most; the run takes far less than 10 s, so 1 is expected.
    let windows = elapsed.as_secs() / 10 + 1;
    assert!(
        extra >= 1 && extra as u64 <= windows,
        "{extra} fetches in {elapsed:?}"
    );
    assert_eq!(rejections(admin, "unknown_key").await, before + 1000.0);
    assert_eq!(s.echo.requests(), 0);
}

#[tokio::test]
async fn readiness_waits_for_discovery_and_the_jwks() {
    let issuer = Issuer::start().await;
    let key = Key::rsa("rsa-1");
    issuer.publish(&[&key]);
    issuer.set_discovery_up(false);
    issuer.set_jwks_up(false);
    let echo = support::echo().await;
    let proxy = support::proxy(&yaml(&issuer, &echo, "")).await;
    let readyz = async || {
        let r = client()
            .get(format!("http://{}/readyz", proxy.admin_addr))
            .send()
            .await
            .expect("readyz");
        (r.status().as_u16(), r.text().await.expect("body"))
    };
    let (status, body) = readyz().await;
    assert_eq!(status, 503);
    assert!(
        body.contains("discovery") && body.contains("jwks"),
        "{body}"
    );
    let token = key.sign(&key.header(), &issuer.claims(AUDIENCE, SCOPE));
    assert_eq!(call(proxy.addr, &token).await.0, 503, "no keys yet");

    issuer.set_discovery_up(true);
    let only_jwks = eventually(Duration::from_secs(10), async || {
        let (status, body) = readyz().await;
        status == 503 && body.contains("jwks") && !body.contains("discovery")
    })
    .await;
    assert!(only_jwks, "discovery done, JWKS still pending");
    assert!(
        eventually(Duration::from_secs(5), async || {
            metric(
                proxy.admin_addr,
                "txp_jwks_refreshes_total{result=\"failure\"}",
            )
            .await
            .unwrap_or(0.0)
                >= 1.0
        })
        .await,
        "the failed JWKS fetch is counted"
    );

    issuer.set_jwks_up(true);
    assert!(ready(proxy.admin_addr).await, "ready once the JWKS loads");
    assert_eq!(call(proxy.addr, &token).await.0, 200);
    let ok = metric(
        proxy.admin_addr,
        "txp_jwks_refreshes_total{result=\"success\"}",
    )
    .await;
    assert!(ok.is_some_and(|v| v >= 1.0));
}

#[tokio::test]
async fn passthrough_forwards_a_valid_token_unchanged_and_never_an_invalid_one() {
    let s = setup().await;
    let token = s.ec.sign(
        &s.ec.header(),
        &s.issuer.claims(AUDIENCE, "openid notes.read"),
    );
    let (status, _, body) = call(s.proxy.addr, &token).await;
    assert_eq!(status, 200);
    let seen = s.echo.last().expect("backend saw the request");
    assert_eq!(
        seen.headers.get("authorization").expect("authorization"),
        format!("Bearer {token}").as_str()
    );
    assert_eq!(body["path"], "/mcp");
    // Served again from the validation cache: still forwarded unchanged.
    assert_eq!(call(s.proxy.addr, &token).await.0, 200);
    assert_eq!(s.echo.requests(), 2);

    let forged = Key::ec("ec-1").sign(&s.ec.header(), &s.issuer.claims(AUDIENCE, SCOPE));
    assert_eq!(call(s.proxy.addr, &forged).await.0, 401);
    assert_eq!(s.echo.requests(), 2);
}

#[tokio::test]
async fn opaque_tokens_are_introspected_with_basic_auth_and_cached() {
    let issuer = Issuer::start().await;
    let key = Key::rsa("rsa-1");
    issuer.publish(&[&key]);
    issuer.require_introspection_basic("txp+client", "s%3Acret");
    let dir = tempfile::tempdir().expect("tempdir");
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "s:cret\n").expect("write secret");
    let echo = support::echo().await;
    let extra = format!(
        ", introspection: {{client_id: 'txp client', client_secret_file: '{}'}}",
        secret.display()
    );
    let proxy = support::proxy(&yaml(&issuer, &echo, &extra)).await;
    assert!(ready(proxy.admin_addr).await);

    let exp = issuer::now() + 600;
    issuer.register_opaque(
        "opaque-active",
        json!({"active": true, "sub": "bob", "aud": AUDIENCE, "iss": issuer.url(), "exp": exp, "scope": SCOPE}),
    );
    issuer.register_opaque(
        "opaque-other-aud",
        json!({"active": true, "aud": "other", "exp": exp, "scope": SCOPE}),
    );
    issuer.register_opaque(
        "opaque-no-scope",
        json!({"active": true, "aud": AUDIENCE, "exp": exp}),
    );

    for _ in 0..3 {
        assert_eq!(call(proxy.addr, "opaque-active").await.0, 200);
    }
    assert_eq!(issuer.introspections(), 1, "cached after the first call");
    let (status, challenge, _) = call(proxy.addr, "opaque-revoked").await;
    assert_eq!(status, 401);
    assert!(challenge.contains("token is not active"), "{challenge}");
    assert_eq!(rejections(proxy.admin_addr, "inactive").await, 1.0);
    let (status, challenge, _) = call(proxy.addr, "opaque-other-aud").await;
    assert_eq!(status, 401);
    assert!(challenge.contains("wrong audience"), "{challenge}");
    assert_eq!(call(proxy.addr, "opaque-no-scope").await.0, 403);
    // JWTs are still verified locally, never introspected.
    let jwt = key.sign(&key.header(), &issuer.claims(AUDIENCE, SCOPE));
    assert_eq!(call(proxy.addr, &jwt).await.0, 200);
    assert_eq!(issuer.introspections(), 4);
    assert_eq!(echo.requests(), 4);

    // The IdP refuses the proxy's credentials: 503, not a verdict on the token.
    issuer.require_introspection_basic("someone", "else");
    assert_eq!(call(proxy.addr, "opaque-unseen").await.0, 503);
}

#[tokio::test]
async fn jwks_cache_control_is_honoured_but_bounded() {
    // max-age=1 is below the floor (60 s): no second fetch happens within the test.
    let issuer = Issuer::start().await;
    let key = Key::rsa("rsa-1");
    issuer.publish(&[&key]);
    issuer.set_jwks_cache_control(Some("public, max-age=1"));
    let echo = support::echo().await;
    let proxy = support::proxy(&yaml(&issuer, &echo, "")).await;
    assert!(ready(proxy.admin_addr).await);
    let fetches = issuer.jwks_fetches();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(issuer.jwks_fetches(), fetches);
}
