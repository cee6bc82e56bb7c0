//! Microsoft Entra ID On-Behalf-Of (README "Microsoft Entra ID", "Several issuers"): the proxy
//! in front of an echo backend, trusting an in-process Entra tenant and exchanging with
//! `grant: jwt_bearer_obo`, through each of the tenant's answers.

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use jsonwebtoken::{Algorithm, DecodingKey};
use serde_json::json;
use tempfile::TempDir;

use crate::support::entra::{
    Answer, CA_CLAIMS, CLIENT_ID, Credential, Entra, FEDERATION_AUDIENCE, OBO_GRANT,
};
use crate::support::issuer::{Key, now};
use crate::support::{Echo, client, eventually, metric, wait_ready};

/// The resource API the backend is registered as, and the scope the proxy asks for.
const BACKEND_SCOPE: &str = "api://notes-backend/.default";
const SECRET: &str = "Zx8Q~s3cr3t.value-with~tilde";

struct Obo {
    entra: Entra,
    echo: Echo,
    proxy: token_exchange_proxy::server::Running,
    http: reqwest::Client,
    dir: TempDir,
}

impl Obo {
    /// A user token for the MCP API, as a client obtained it from the tenant.
    fn user_token(&self, oid: &str) -> String {
        self.entra.user_token(oid, "mcp.tools")
    }

    async fn get(&self, token: &str) -> reqwest::Response {
        self.http
            .get(format!("http://{}/mcp", self.proxy.addr))
            .header("authorization", format!("Bearer {token}"))
            .send()
            .await
            .expect("request")
    }
}

/// The proxy trusting `entra` and exchanging there on behalf of its users, authenticating
/// with `client_auth` (a YAML flow map; `{dir}` stands for a directory of files); `top` is
/// appended at the top level.
async fn obo(entra: Entra, client_auth: &str, files: &[(&str, &str)], top: &str) -> Obo {
    let dir = tempfile::tempdir().expect("tempdir");
    for (name, content) in files {
        std::fs::write(dir.path().join(name), content).expect("write");
    }
    let client_auth = client_auth.replace("{dir}", &dir.path().display().to_string());
    let echo = crate::support::echo().await;
    let yaml = format!(
        "upstream: {{url: '{}'}}\n\
         inbound: {{issuer: '{}', audiences: ['{CLIENT_ID}', 'api://{CLIENT_ID}'], required_scopes: [mcp.tools]}}\n\
         exchange: {{grant: jwt_bearer_obo, client_id: '{CLIENT_ID}', client_auth: {client_auth}, scope: '{BACKEND_SCOPE}', timeout: 2s}}\n{top}",
        echo.url(),
        entra.issuer(),
    );
    let proxy = crate::support::proxy(&yaml).await;
    wait_ready(proxy.admin_addr).await;
    Obo {
        entra,
        echo,
        proxy,
        http: client(),
        dir,
    }
}

async fn with_secret(method: &str, top: &str) -> Obo {
    let entra = Entra::start(Credential::Secret(SECRET.into())).await;
    obo(
        entra,
        &format!("{{method: {method}, secret_file: '{{dir}}/secret'}}"),
        &[("secret", SECRET)],
        top,
    )
    .await
}

fn forwarded_authorization(echo: &Echo) -> String {
    echo.last()
        .expect("the backend saw the request")
        .headers
        .get("authorization")
        .expect("authorization forwarded")
        .to_str()
        .expect("ascii")
        .to_owned()
}

#[tokio::test]
async fn obo_requests_are_the_documented_form_and_the_issued_token_reaches_the_backend() {
    for method in ["client_secret_post", "client_secret_basic"] {
        let p = with_secret(method, "").await;
        let token = p.user_token("00000000-0000-0000-0000-0000000a11ce");
        let resp = p.get(&token).await;
        assert_eq!(
            resp.status(),
            200,
            "{method}: {}",
            resp.text().await.unwrap_or_default()
        );

        let seen = p.entra.last();
        assert_eq!(seen.error_code, None, "{method}");
        let issued = seen.issued.clone().expect("a token was issued");
        assert_eq!(forwarded_authorization(&p.echo), format!("Bearer {issued}"));
        assert_ne!(issued, token);

        // Microsoft's OBO request, and nothing of RFC 8693.
        assert_eq!(seen.param("grant_type"), Some(OBO_GRANT));
        assert_eq!(seen.param("assertion"), Some(token.as_str()));
        assert_eq!(seen.param("requested_token_use"), Some("on_behalf_of"));
        assert_eq!(seen.param("scope"), Some(BACKEND_SCOPE));
        for absent in [
            "subject_token",
            "subject_token_type",
            "requested_token_type",
            "audience",
            "resource",
        ] {
            assert_eq!(seen.param(absent), None, "{method}: {absent} sent");
        }
        let mut names: Vec<&str> = seen.form.iter().map(|(k, _)| k.as_str()).collect();
        names.sort_unstable();
        let expected: &[&str] = if method == "client_secret_post" {
            &[
                "assertion",
                "client_id",
                "client_secret",
                "grant_type",
                "requested_token_use",
                "scope",
            ]
        } else {
            &["assertion", "grant_type", "requested_token_use", "scope"]
        };
        assert_eq!(names, expected, "{method}");

        // Cached: one OBO call per token however many requests.
        for _ in 0..5 {
            assert_eq!(p.get(&token).await.status(), 200);
        }
        assert_eq!(p.entra.calls(), 1, "{method}");
        assert_eq!(p.echo.requests(), 6);
        // The start-up credentials probe (an assertion no tenant accepts) was answered
        // `invalid_grant`, which shows the secret is good: the proxy stays ready.
        let probed = eventually(Duration::from_secs(5), async || p.entra.probes() >= 1).await;
        assert!(probed, "{method}: the start-up credentials probe ran");
        let admin = p.proxy.admin_addr;
        let r = client().get(format!("http://{admin}/readyz")).send().await;
        assert_eq!(r.expect("readyz").status(), 200, "{method}");
    }
}

#[tokio::test]
async fn a_federated_credential_is_the_projected_service_account_token() {
    let k8s = Key::rsa("sa-key");
    let sa_issuer = "https://oidc.prod-aks.example/7c1f";
    let subject = "system:serviceaccount:mcp:token-exchange-proxy";
    let sa_token = |aud: &str| {
        let now = now();
        k8s.sign(
            &json!({"alg": "RS256", "kid": "sa-key"}),
            &json!({"iss": sa_issuer, "sub": subject, "aud": [aud], "iat": now, "nbf": now, "exp": now + 3600}),
        )
    };
    let entra = Entra::start(Credential::Federated {
        issuer: sa_issuer.into(),
        subject: subject.into(),
        key: k8s.clone(),
    })
    .await;
    let p = obo(
        entra,
        "{method: client_assertion_file, assertion_file: '{dir}/azure-identity-token'}",
        &[("azure-identity-token", &sa_token(FEDERATION_AUDIENCE))],
        "",
    )
    .await;
    let token = p.user_token("00000000-0000-0000-0000-0000000a11ce");
    assert_eq!(p.get(&token).await.status(), 200);
    let seen = p.entra.last();
    assert_eq!(seen.param("client_id"), Some(CLIENT_ID));
    assert_eq!(
        seen.param("client_assertion_type"),
        Some("urn:ietf:params:oauth:client-assertion-type:jwt-bearer")
    );
    assert_eq!(
        forwarded_authorization(&p.echo),
        format!("Bearer {}", seen.issued.expect("issued"))
    );

    // The kubelet writes a token for another audience: the tenant refuses the client, which
    // is the proxy's own misconfiguration (502), never the user's.
    std::fs::write(
        p.dir.path().join("azure-identity-token"),
        sa_token("https://kubernetes.default.svc"),
    )
    .expect("write");
    let resp = p
        .get(&p.user_token("00000000-0000-0000-0000-000000000b0b"))
        .await;
    assert_eq!(resp.status(), 502);
    assert_eq!(p.entra.last().error_code, Some(70021));
    assert_eq!(
        p.echo.requests(),
        1,
        "nothing forwarded without an exchange"
    );
}

#[tokio::test]
async fn a_certificate_credential_is_named_by_its_thumbprint() {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).expect("RSA key");
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "token-exchange-proxy");
    let cert = params.self_signed(&key).expect("certificate");
    let entra = Entra::start(Credential::Certificate {
        der: cert.der().to_vec(),
        key: DecodingKey::from_rsa_pem(key.public_key_pem().as_bytes()).expect("public key"),
        alg: Algorithm::RS256,
    })
    .await;
    let p = obo(
        entra,
        "{method: private_key_jwt, private_key_file: '{dir}/tls.key', certificate_file: '{dir}/tls.crt'}",
        &[("tls.key", &key.serialize_pem()), ("tls.crt", &cert.pem())],
        "",
    )
    .await;
    let token = p.user_token("00000000-0000-0000-0000-0000000a11ce");
    assert_eq!(p.get(&token).await.status(), 200);
    let seen = p.entra.last();
    assert_eq!(seen.error_code, None);
    let assertion = seen.param("client_assertion").expect("client assertion");
    let header = jsonwebtoken::decode_header(assertion).expect("header");
    assert_eq!(header.alg, Algorithm::RS256);
    assert!(
        header.x5t.is_some() && header.x5t_s256.is_some(),
        "{header:?}"
    );

    // cert-manager renews the pair: another key and certificate, read on the next exchange.
    // Until the new certificate is uploaded to the registration, the tenant refuses it: 502.
    let renewed = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).expect("RSA key");
    let renewed_cert = params.self_signed(&renewed).expect("certificate");
    std::fs::write(p.dir.path().join("tls.key"), renewed.serialize_pem()).expect("write");
    std::fs::write(p.dir.path().join("tls.crt"), renewed_cert.pem()).expect("write");
    let resp = p
        .get(&p.user_token("00000000-0000-0000-0000-000000000b0b"))
        .await;
    assert_eq!(resp.status(), 502);
    assert_eq!(p.entra.last().error_code, Some(700027));
}

#[tokio::test]
async fn each_entra_answer_becomes_the_documented_response() {
    let p = with_secret("client_secret_post", "").await;
    let resource_metadata = format!(
        "http://{}/.well-known/oauth-protected-resource/mcp",
        p.proxy.addr
    );

    // Conditional Access: the claims challenge goes back to the client, base64-encoded.
    p.entra.answer(Answer::ClaimsChallenge);
    let resp = p.get(&p.user_token("u-ca")).await;
    assert_eq!(resp.status(), 401);
    let challenge = resp.headers()["www-authenticate"]
        .to_str()
        .expect("ascii")
        .to_owned();
    assert_eq!(
        challenge,
        format!(
            "Bearer error=\"insufficient_claims\", claims=\"{}\", resource_metadata=\"{resource_metadata}\"",
            STANDARD.encode(CA_CLAIMS)
        )
    );
    let body: serde_json::Value = resp.json().await.expect("json");
    assert_eq!(body["error"], "insufficient_claims");
    assert_eq!(p.entra.last().error_code, Some(50079));

    // Consent missing (AADSTS65001, suberror consent_required): 403 insufficient_scope.
    p.entra.answer(Answer::ConsentRequired);
    let resp = p.get(&p.user_token("u-consent")).await;
    assert_eq!(resp.status(), 403);
    let challenge = resp.headers()["www-authenticate"].to_str().expect("ascii");
    assert!(
        challenge.starts_with("Bearer error=\"insufficient_scope\""),
        "{challenge}"
    );
    assert_eq!(p.entra.last().error_code, Some(65001));

    // Interaction required without claims: the user's token is not good for this.
    p.entra.answer(Answer::InteractionRequired);
    let resp = p.get(&p.user_token("u-mfa")).await;
    assert_eq!(resp.status(), 401);
    let challenge = resp.headers()["www-authenticate"].to_str().expect("ascii");
    assert!(challenge.contains("error=\"invalid_token\""), "{challenge}");
    assert_eq!(p.entra.last().error_code, Some(50158));

    // Entra unavailable, with its own Retry-After: 503 with it.
    p.entra.answer(Answer::Error {
        status: 503,
        error: "temporarily_unavailable",
        code: 50089,
        retry_after: Some("7"),
    });
    let resp = p.get(&p.user_token("u-busy")).await;
    assert_eq!(resp.status(), 503);
    assert_eq!(resp.headers()["retry-after"], "7");
    let text = resp.text().await.expect("body");
    assert!(
        !text.contains("AADSTS") && !text.contains("Trace ID"),
        "Entra's text leaked: {text}"
    );

    assert_eq!(p.echo.requests(), 0, "no refusal reached the backend");
    let admin = p.proxy.admin_addr;
    assert_eq!(
        metric(admin, "txp_exchange_requests_total{result=\"rejected\"}").await,
        Some(3.0)
    );
}

#[tokio::test]
async fn a_wrong_client_secret_is_the_proxys_fault_and_shows_in_readyz() {
    let entra = Entra::start(Credential::Secret("the-right-one".into())).await;
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("secret"), "an-old-one").expect("write");
    let echo = crate::support::echo().await;
    let yaml = format!(
        "upstream: {{url: '{}'}}\n\
         inbound: {{issuer: '{}', audiences: ['{CLIENT_ID}']}}\n\
         exchange: {{grant: jwt_bearer_obo, client_id: '{CLIENT_ID}', client_auth: {{method: client_secret_post, secret_file: '{}/secret'}}, scope: '{BACKEND_SCOPE}', timeout: 2s}}\n",
        echo.url(),
        entra.issuer(),
        dir.path().display(),
    );
    let proxy = crate::support::proxy(&yaml).await;
    let admin = proxy.admin_addr;
    let unready = eventually(Duration::from_secs(15), async || {
        let Ok(r) = client().get(format!("http://{admin}/readyz")).send().await else {
            return false;
        };
        r.status() == 503
            && r.text()
                .await
                .is_ok_and(|t| t.contains("token_endpoint: credentials rejected"))
    })
    .await;
    assert!(unready, "a rejected secret keeps the proxy unready");
    assert!(entra.probes() >= 1);

    let resp = client()
        .get(format!("http://{}/mcp", proxy.addr))
        .bearer_auth(entra.user_token("u-1", "mcp.tools"))
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 502);
    assert_eq!(entra.last().error_code, Some(7000215));
    assert_eq!(echo.requests(), 0);

    std::fs::write(dir.path().join("secret"), "the-right-one").expect("write");
    let ready = eventually(Duration::from_secs(40), async || {
        let r = client().get(format!("http://{admin}/readyz")).send().await;
        r.is_ok_and(|r| r.status() == 200)
    })
    .await;
    assert!(ready, "the fixed secret is picked up by a re-probe");
}

#[tokio::test]
async fn the_issued_tokens_lifetime_comes_from_expires_in() {
    let p = with_secret(
        "client_secret_post",
        "cache: {expiry_margin: 1s, refresh_ahead: 0s}\n",
    )
    .await;
    p.entra.answer(Answer::Issue { expires_in: 3 });
    let token = p.user_token("u-short");
    assert_eq!(p.get(&token).await.status(), 200);
    assert_eq!(p.get(&token).await.status(), 200);
    assert_eq!(
        p.entra.calls(),
        1,
        "served from the cache within its lifetime"
    );
    let first = forwarded_authorization(&p.echo);

    // Past expires_in - expiry_margin (2 s): a new OBO call, a new token.
    tokio::time::sleep(Duration::from_millis(2_300)).await;
    assert_eq!(p.get(&token).await.status(), 200);
    assert_eq!(p.entra.calls(), 2);
    assert_ne!(forwarded_authorization(&p.echo), first);
}
