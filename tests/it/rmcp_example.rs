//! The embedded use of README "Use as a library": `examples/rmcp_server.rs` started
//! in-process, its `whoami` tool called by an rmcp client over streamable HTTP, against the
//! in-process issuer and token endpoint.

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rmcp::ServiceExt as _;
use rmcp::model::CallToolRequestParams;
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::time::timeout;

use token_exchange_proxy::config;
use token_exchange_proxy::metrics::RejectReason;

use crate::support::eventually;
use crate::support::issuer::{Issuer, Key};
use crate::support::token_endpoint::{Answer, ClientAuth, TokenEndpoint};

// `main` and what only it uses are dead code here.
#[allow(dead_code)]
#[path = "../../examples/rmcp_server.rs"]
mod rmcp_server;

/// The audience of client tokens.
const AUDIENCE: &str = "mcp-server";
/// The audience the server asks the exchanged token for.
const EXCHANGE_AUDIENCE: &str = "notes-api";
/// The server's client id at the token endpoint.
const CLIENT_ID: &str = "txp";
/// Bounds every wait.
const LIMIT: Duration = Duration::from_secs(20);

/// The example serving on 127.0.0.1:0 in exchange mode, with its peers.
struct Example {
    issuer: Issuer,
    key: Key,
    idp: TokenEndpoint,
    server: rmcp_server::Server,
    /// `http://127.0.0.1:PORT`
    origin: String,
}

async fn example() -> Example {
    let issuer = Issuer::start().await;
    let key = Key::ec("k1");
    issuer.publish(&[&key]);
    let idp = TokenEndpoint::start(ClientAuth::None {
        id: CLIENT_ID.into(),
    })
    .await;
    idp.answer(Answer::IssueJwt { expires_in: 300 });
    // One IdP: it signs the tokens it issues with the key the proxy trusts.
    idp.sign_as(&issuer.url(), &key);
    // No `upstream`: the example has no use for one.
    let yaml = format!(
        "listen: 127.0.0.1:0\n\
         inbound: {{issuer: '{}', audiences: [{AUDIENCE}]}}\n\
         exchange: {{token_endpoint: '{}', client_id: {CLIENT_ID}, client_auth: {{method: none}}, audience: [{EXCHANGE_AUDIENCE}], timeout: 2s}}\n",
        issuer.url(),
        idp.url(),
    );
    let raw = config::parse_yaml(&yaml).expect("yaml parses");
    let config = rmcp_server::validate(raw).expect("valid without upstream");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let origin = format!("http://{}", listener.local_addr().expect("addr"));
    let server = rmcp_server::start(&config, listener).expect("server starts");
    let ready = eventually(LIMIT, async || server.protection.readiness.check().is_ok()).await;
    assert!(ready, "the keys never loaded");
    Example {
        issuer,
        key,
        idp,
        server,
        origin,
    }
}

impl Example {
    /// A fresh client token (unique `jti`), issued for [`AUDIENCE`].
    fn token(&self) -> String {
        let claims = self.issuer.claims(AUDIENCE, "notes.read");
        self.key.sign(&self.key.header(), &claims)
    }

    /// An rmcp client transport to `/mcp`, sending `Authorization: Bearer <token>` if given.
    fn transport(&self, token: Option<&str>) -> StreamableHttpClientTransport<reqwest::Client> {
        let mut config =
            StreamableHttpClientTransportConfig::with_uri(format!("{}/mcp", self.origin));
        if let Some(token) = token {
            config = config.auth_header(token);
        }
        StreamableHttpClientTransport::with_client(http(), config)
    }
}

/// A plain client that ignores any proxy settings of the environment.
fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(LIMIT)
        .build()
        .expect("client")
}

/// The claims of a compact JWS, read without verification.
fn claims_of(token: &str) -> Value {
    let payload = token.split('.').nth(1).expect("a JWS");
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).expect("base64url")).expect("json")
}

#[tokio::test]
async fn the_whoami_tool_sees_the_exchanged_token_never_the_clients() {
    let e = example().await;
    let client_token = e.token();
    let client = timeout(LIMIT, ().serve(e.transport(Some(&client_token))))
        .await
        .expect("in time")
        .expect("the MCP session opens");
    let tools = client.list_all_tools().await.expect("tools/list");
    assert_eq!(
        tools.iter().map(|t| t.name.as_ref()).collect::<Vec<_>>(),
        ["whoami"]
    );

    let result = timeout(
        LIMIT,
        client.call_tool(CallToolRequestParams::new("whoami")),
    )
    .await
    .expect("in time")
    .expect("tools/call");
    let seen = result.structured_content.expect("structured content");
    let client_claims = claims_of(&client_token);
    assert_eq!(
        seen,
        json!({"sub": client_claims["sub"], "aud": EXCHANGE_AUDIENCE, "act": {"sub": CLIENT_ID}}),
        "the tool saw the exchanged token"
    );
    assert_eq!(client_claims["aud"], AUDIENCE);
    assert!(client_claims.get("act").is_none());

    // Every request of the session carried the client token: it was exchanged once, and what
    // the tool saw are the claims of the token issued in return.
    let exchanges = e.idp.seen();
    assert_eq!(exchanges.len(), 1, "one exchange per client token");
    assert_eq!(
        exchanges[0].param("subject_token"),
        Some(client_token.as_str())
    );
    let issued = claims_of(exchanges[0].issued.as_deref().expect("a token was issued"));
    for claim in ["sub", "aud", "act"] {
        assert_eq!(seen[claim], issued[claim], "{claim}");
    }

    // Nothing but `/mcp` is served, even with a good token.
    let other = http()
        .get(format!("{}/other", e.origin))
        .bearer_auth(&client_token)
        .send()
        .await
        .expect("request");
    assert_eq!(other.status(), 404);
    assert_eq!(e.idp.calls(), 1, "the exchanged token came from the cache");
    client.cancel().await.expect("session closes");
}

#[tokio::test]
async fn a_request_without_a_token_gets_the_challenge_and_never_reaches_the_tool() {
    let e = example().await;
    let call = json!({
        "jsonrpc": "2.0", "id": 1, "method": "tools/call",
        "params": {"name": "whoami", "arguments": {}},
    });
    let resp = http()
        .post(format!("{}/mcp", e.origin))
        .header("accept", "application/json, text/event-stream")
        .json(&call)
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 401);
    let metadata_url = format!("{}/.well-known/oauth-protected-resource/mcp", e.origin);
    assert_eq!(
        resp.headers()["www-authenticate"],
        format!("Bearer resource_metadata=\"{metadata_url}\"").as_str()
    );
    // Refused by the layer in front (its body, its counter), not by rmcp.
    let body: Value = resp.json().await.expect("json body");
    assert_eq!(body["error"], "unauthorized");
    assert!(body.get("jsonrpc").is_none(), "{body}");
    let rejections = &e.server.protection.metrics.token_rejections;
    assert_eq!(rejections.get(RejectReason::Missing), 1);
    assert_eq!(e.idp.calls(), 0);

    // The challenge leads an MCP client to the authorization server (RFC 9728).
    let doc: Value = http()
        .get(&metadata_url)
        .send()
        .await
        .expect("request")
        .json()
        .await
        .expect("json");
    assert_eq!(doc["resource"], format!("{}/mcp", e.origin));
    assert_eq!(doc["authorization_servers"], json!([e.issuer.url()]));

    // An MCP client without a token cannot open a session.
    let refused = timeout(LIMIT, ().serve(e.transport(None)))
        .await
        .expect("in time");
    assert!(refused.is_err(), "a session opened without a token");
    assert!(rejections.get(RejectReason::Missing) >= 2);
    assert_eq!(e.idp.calls(), 0);
}
