//! Several issuers behind one proxy (README "Several issuers"): two profiles, each with its
//! own issuer, keys and IdP; a token's `iss` picks the profile, and only that profile's keys
//! and IdP are used for it.

use std::time::Duration;

use serde_json::json;

use crate::support::issuer::{Issuer, Key};
use crate::support::token_endpoint::{ClientAuth, TokenEndpoint};
use crate::support::{Echo, client, eventually, metric};

struct Side {
    issuer: Issuer,
    key: Key,
    idp: TokenEndpoint,
}

impl Side {
    async fn start(kid: &str) -> Self {
        let issuer = Issuer::start().await;
        let key = Key::ec(kid);
        issuer.publish(&[&key]);
        let idp = TokenEndpoint::start(ClientAuth::None { id: "txp".into() }).await;
        Self { issuer, key, idp }
    }

    fn token(&self, sub: &str) -> String {
        let mut claims = self.issuer.claims("mcp", "");
        claims["sub"] = sub.into();
        self.key.sign(&self.key.header(), &claims)
    }

    fn profile(&self, name: &str) -> String {
        format!(
            "  - name: {name}\n    inbound: {{issuer: '{}', audiences: [mcp]}}\n    exchange: {{token_endpoint: '{}', client_id: txp, client_auth: {{method: none}}, audience: [backend-{name}], timeout: 2s}}\n",
            self.issuer.url(),
            self.idp.url()
        )
    }
}

struct TwoIssuers {
    corp: Side,
    partner: Side,
    echo: Echo,
    proxy: token_exchange_proxy::server::Running,
}

impl TwoIssuers {
    async fn get(&self, token: &str) -> reqwest::Response {
        client()
            .get(format!("http://{}/mcp", self.proxy.addr))
            .bearer_auth(token)
            .send()
            .await
            .expect("request")
    }

    async fn readyz(&self) -> (u16, String) {
        let r = client()
            .get(format!("http://{}/readyz", self.proxy.admin_addr))
            .send()
            .await
            .expect("readyz");
        (r.status().as_u16(), r.text().await.unwrap_or_default())
    }
}

/// Starts both sides and the proxy; the partner's discovery and JWKS are down until the
/// proxy has said so in `/readyz`.
async fn two_issuers() -> TwoIssuers {
    let corp = Side::start("corp-key").await;
    let partner = Side::start("partner-key").await;
    partner.issuer.set_discovery_up(false);
    partner.issuer.set_jwks_up(false);
    let echo = crate::support::echo().await;
    let yaml = format!(
        "upstream: {{url: '{}'}}\nprofiles:\n{}{}",
        echo.url(),
        corp.profile("corp"),
        partner.profile("partner")
    );
    let p = TwoIssuers {
        proxy: crate::support::proxy(&yaml).await,
        corp,
        partner,
        echo,
    };
    // Corp gets ready on its own; `/readyz` names what the partner profile still waits for.
    let named = eventually(Duration::from_secs(10), async || {
        let (status, body) = p.readyz().await;
        status == 503 && body.contains("partner/jwks") && !body.contains("corp/")
    })
    .await;
    assert!(named, "{:?}", p.readyz().await);
    p.partner.issuer.set_discovery_up(true);
    p.partner.issuer.set_jwks_up(true);
    let ready = eventually(Duration::from_secs(20), async || p.readyz().await.0 == 200).await;
    assert!(ready, "proxy never became ready: {:?}", p.readyz().await);
    p
}

#[tokio::test]
async fn each_profiles_tokens_are_exchanged_at_its_own_idp() {
    let p = two_issuers().await;

    let corp = p.corp.token("alice");
    for _ in 0..3 {
        assert_eq!(p.get(&corp).await.status(), 200);
    }
    assert_eq!((p.corp.idp.calls(), p.partner.idp.calls()), (1, 0));
    let seen = p.corp.idp.last();
    assert_eq!(seen.param("subject_token"), Some(corp.as_str()));
    assert_eq!(seen.params("audience"), ["backend-corp"]);

    let partner = p.partner.token("bob");
    for _ in 0..3 {
        assert_eq!(p.get(&partner).await.status(), 200);
    }
    assert_eq!((p.corp.idp.calls(), p.partner.idp.calls()), (1, 1));
    let seen = p.partner.idp.last();
    assert_eq!(seen.param("subject_token"), Some(partner.as_str()));
    assert_eq!(seen.params("audience"), ["backend-partner"]);

    // The backend saw each profile's exchanged token, never a client token.
    let forwarded: Vec<String> = p
        .echo
        .seen
        .lock()
        .expect("lock")
        .iter()
        .map(|s| {
            s.headers["authorization"]
                .to_str()
                .expect("ascii")
                .to_owned()
        })
        .collect();
    assert_eq!(forwarded.len(), 6);
    assert!(
        forwarded
            .iter()
            .all(|a| !a.contains(&corp) && !a.contains(&partner))
    );

    let admin = p.proxy.admin_addr;
    for profile in ["corp", "partner"] {
        assert_eq!(
            metric(
                admin,
                &format!("txp_exchange_requests_total{{result=\"success\",profile=\"{profile}\"}}")
            )
            .await,
            Some(1.0),
            "{profile}"
        );
    }
}

#[tokio::test]
async fn a_token_naming_one_issuer_and_signed_with_the_others_key_is_refused() {
    let p = two_issuers().await;

    // `iss` of the partner, signed with corp's key (whose `kid` the corp JWKS publishes).
    let mut claims = p.partner.issuer.claims("mcp", "");
    claims["sub"] = "mallory".into();
    let forged = p.corp.key.sign(&p.corp.key.header(), &claims);
    let resp = p.get(&forged).await;
    assert_eq!(resp.status(), 401);
    let challenge = resp.headers()["www-authenticate"].to_str().expect("ascii");
    assert!(challenge.contains("error=\"invalid_token\""), "{challenge}");

    // The other way round, naming the `kid` of corp's key: the signature does not verify.
    let mut claims = p.corp.issuer.claims("mcp", "");
    claims["sub"] = "mallory".into();
    let forged = p.partner.key.sign(&p.corp.key.header(), &claims);
    assert_eq!(p.get(&forged).await.status(), 401);

    // An issuer no profile names: 401, counted with no profile.
    let stranger = Key::ec("stranger");
    let mut claims = p.corp.issuer.claims("mcp", "");
    claims["iss"] = json!("https://idp.elsewhere.example");
    let resp = p.get(&stranger.sign(&stranger.header(), &claims)).await;
    assert_eq!(resp.status(), 401);
    let body: serde_json::Value = resp.json().await.expect("json");
    assert_eq!(body["error"], "invalid_token");

    assert_eq!((p.corp.idp.calls(), p.partner.idp.calls()), (0, 0));
    assert_eq!(p.echo.requests(), 0, "nothing reached the backend");
    let admin = p.proxy.admin_addr;
    assert_eq!(
        metric(
            admin,
            "txp_token_rejections_total{reason=\"issuer\",profile=\"\"}"
        )
        .await,
        Some(1.0)
    );
    assert_eq!(
        metric(
            admin,
            "txp_token_rejections_total{reason=\"unknown_key\",profile=\"partner\"}"
        )
        .await,
        Some(1.0)
    );
    assert_eq!(
        metric(
            admin,
            "txp_token_rejections_total{reason=\"signature\",profile=\"corp\"}"
        )
        .await,
        Some(1.0)
    );
}
