//! What a security review of the request path asked for (README "HTTP behaviour"): the
//! backend's challenges, `public_url` with a path, forwarding headers from untrusted peers,
//! CORS for browser clients, access lines at shutdown, and exchange mode that cannot run
//! without its exchanger.

use std::time::Duration;

use http::header;

use crate::support::{self, client, echo, signed};

/// The values of `name` in `headers`, as strings.
fn all(headers: &http::HeaderMap, name: impl http::header::AsHeaderName) -> Vec<String> {
    headers
        .get_all(name)
        .iter()
        .map(|v| v.to_str().expect("ascii").to_owned())
        .collect()
}

#[tokio::test]
async fn a_backend_challenge_is_replaced_by_the_proxys_own() {
    let backend = echo().await;
    let s = signed(
        &backend.url(),
        "",
        "",
        "public_url: https://mcp.example.com\n",
    )
    .await;
    let resp = client()
        .get(s.url("/challenge"))
        .bearer_auth(&s.token)
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 401, "the backend's status is kept");
    let challenges = all(resp.headers(), header::WWW_AUTHENTICATE);
    assert_eq!(
        challenges,
        [
            "Bearer resource_metadata=\"https://mcp.example.com/.well-known/oauth-protected-resource/challenge\""
        ]
    );
    assert!(
        !challenges.concat().contains(&backend.addr.to_string()),
        "the backend's address leaked: {challenges:?}"
    );
}

#[tokio::test]
async fn public_url_with_a_path_gives_consistent_metadata() {
    let backend = echo().await;
    let s = signed(
        &backend.url(),
        "",
        "",
        "public_url: https://h.example/tenant\n",
    )
    .await;
    let expected = "Bearer resource_metadata=\"https://h.example/.well-known/oauth-protected-resource/tenant/mcp\"";
    // Whether the ingress strips the public path or not.
    for path in ["/mcp", "/tenant/mcp"] {
        let resp = client().get(s.url(path)).send().await.expect("request");
        assert_eq!(resp.status(), 401, "{path}");
        assert_eq!(
            all(resp.headers(), header::WWW_AUTHENTICATE),
            [expected],
            "{path}"
        );
    }
    // The metadata URL of that challenge names the same resource (RFC 9728 §3.3).
    let resp = client()
        .get(s.url("/.well-known/oauth-protected-resource/tenant/mcp"))
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 200);
    let doc: serde_json::Value = resp.json().await.expect("json");
    assert_eq!(doc["resource"], "https://h.example/tenant/mcp");
}

/// Sends one request with a full set of client-made forwarding headers and returns the
/// headers the backend saw.
async fn forwarded_as(trusted: &str) -> http::HeaderMap {
    let backend = echo().await;
    let s = signed(&backend.url(), "", "", trusted).await;
    let resp = client()
        .get(s.url("/echo"))
        .bearer_auth(&s.token)
        .header("host", "public.example")
        .header("x-forwarded-for", "10.0.0.1")
        .header("x-forwarded-proto", "https")
        .header("x-forwarded-host", "ingress.example")
        .header("forwarded", "for=203.0.113.7;proto=https")
        .header("x-real-ip", "203.0.113.7")
        .header("x-forwarded-port", "443")
        .header("x-forwarded-prefix", "/admin")
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 200);
    backend.last().expect("forwarded").headers
}

#[tokio::test]
async fn forwarding_headers_from_an_untrusted_peer_are_replaced_or_dropped() {
    let seen = forwarded_as("").await;
    assert_eq!(all(&seen, "x-forwarded-for"), ["127.0.0.1"]);
    assert_eq!(all(&seen, "x-forwarded-proto"), ["http"]);
    assert_eq!(all(&seen, "x-forwarded-host"), ["public.example"]);
    for dropped in [
        "forwarded",
        "x-real-ip",
        "x-forwarded-port",
        "x-forwarded-prefix",
    ] {
        assert!(seen.get(dropped).is_none(), "{dropped} passed: {seen:?}");
    }
}

#[tokio::test]
async fn forwarding_headers_from_a_trusted_proxy_are_kept() {
    let seen = forwarded_as("trusted_proxies: [127.0.0.0/8, '::1/128']\n").await;
    assert_eq!(all(&seen, "x-forwarded-for"), ["10.0.0.1, 127.0.0.1"]);
    assert_eq!(all(&seen, "x-forwarded-proto"), ["https"]);
    assert_eq!(all(&seen, "x-forwarded-host"), ["ingress.example"]);
    assert_eq!(all(&seen, "forwarded"), ["for=203.0.113.7;proto=https"]);
    assert_eq!(all(&seen, "x-real-ip"), ["203.0.113.7"]);
    assert_eq!(all(&seen, "x-forwarded-port"), ["443"]);
    assert_eq!(all(&seen, "x-forwarded-prefix"), ["/admin"]);
}

const INSPECTOR: &str = "https://inspector.example";

fn preflight(url: &str, origin: &str) -> reqwest::RequestBuilder {
    client()
        .request(reqwest::Method::OPTIONS, url)
        .header("origin", origin)
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "authorization, content-type, mcp-protocol-version",
        )
}

#[tokio::test]
async fn a_browser_client_gets_cors_from_allowed_origins() {
    let backend = echo().await;
    let s = signed(
        &backend.url(),
        "",
        "",
        &format!("cors: {{allowed_origins: ['{INSPECTOR}'], max_age: 10m}}\n"),
    )
    .await;
    let resp = preflight(&s.url("/mcp"), INSPECTOR)
        .send()
        .await
        .expect("preflight");
    assert_eq!(resp.status(), 204);
    let h = resp.headers();
    assert_eq!(all(h, "access-control-allow-origin"), [INSPECTOR]);
    let methods = all(h, "access-control-allow-methods")
        .concat()
        .to_ascii_lowercase();
    assert!(methods.contains("post"), "{methods}");
    let allowed = all(h, "access-control-allow-headers")
        .concat()
        .to_ascii_lowercase();
    assert!(allowed.contains("authorization"), "{allowed}");
    assert_eq!(all(h, "access-control-max-age"), ["600"]);
    assert_eq!(backend.requests(), 0, "a preflight was forwarded");

    // A preflight from elsewhere is not granted.
    let resp = preflight(&s.url("/mcp"), "https://evil.example")
        .send()
        .await
        .expect("preflight");
    assert!(resp.headers().get("access-control-allow-origin").is_none());
    assert_eq!(backend.requests(), 0);

    // The real request, and a refused one, both readable by the page.
    for (token, status) in [(Some(&s.token), 200), (None, 401)] {
        let mut req = client().get(s.url("/mcp")).header("origin", INSPECTOR);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.expect("request");
        assert_eq!(resp.status(), status);
        assert_eq!(
            all(resp.headers(), "access-control-allow-origin"),
            [INSPECTOR]
        );
        let exposed = all(resp.headers(), "access-control-expose-headers")
            .concat()
            .to_ascii_lowercase();
        assert!(exposed.contains("www-authenticate"), "{exposed}");
        assert!(exposed.contains("mcp-session-id"), "{exposed}");
    }
}

#[tokio::test]
async fn the_metadata_document_is_open_to_every_origin() {
    let backend = echo().await;
    // No `cors` section: no CORS handling, except for the public metadata document.
    let s = signed(&backend.url(), "", "", "").await;
    let resp = client()
        .get(s.url("/.well-known/oauth-protected-resource/mcp"))
        .header("origin", "https://anywhere.example")
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 200);
    assert_eq!(all(resp.headers(), "access-control-allow-origin"), ["*"]);
    // Without `cors` a preflight is a request like any other: it needs a token.
    let resp = preflight(&s.url("/mcp"), INSPECTOR)
        .send()
        .await
        .expect("preflight");
    assert_eq!(resp.status(), 401);
    assert!(resp.headers().get("access-control-allow-origin").is_none());
}

#[tokio::test]
async fn exchange_mode_without_an_exchanger_cannot_start() {
    let backend = echo().await;
    let mut config = support::config_from(&format!(
        "mode: passthrough\nupstream: {{url: '{}'}}\ninbound: {{issuer: '{}', audiences: [mcp]}}\n",
        backend.url(),
        backend.url()
    ));
    // A state validation never produces, built by hand as an embedding program could.
    config.mode = token_exchange_proxy::config::Mode::Exchange;
    assert!(config.exchange().is_none());
    let started = token_exchange_proxy::server::start(config).await;
    assert!(
        started.is_err(),
        "exchange mode started without an exchanger (it would forward client tokens)"
    );
}

#[tokio::test]
async fn an_sse_stream_cut_at_shutdown_still_gets_its_access_line() {
    let backend = echo().await;
    let issuer = support::issuer::Issuer::start().await;
    let key = support::issuer::Key::ec("ec-1");
    issuer.publish(&[&key]);
    let token = key.sign(&key.header(), &issuer.claims("mcp", ""));
    let mut proc = support::ProxyProcess::spawn(&format!(
        "mode: passthrough\nupstream: {{url: '{}'}}\ninbound: {{issuer: '{}', jwks_uri: '{}', audiences: [mcp]}}\nshutdown: {{drain_delay: 0s, timeout: 1s}}\n",
        backend.url(),
        issuer.url(),
        issuer.jwks_uri()
    ));
    support::wait_ready(proc.admin_addr).await;
    // A stream far longer than the shutdown timeout.
    let mut resp = client()
        .get(format!("http://{}/sse?n=100&gap_ms=200", proc.addr))
        .bearer_auth(&token)
        .send()
        .await
        .expect("stream");
    assert_eq!(resp.status(), 200);
    let first = resp.chunk().await.expect("chunk");
    assert!(first.is_some());
    proc.terminate();
    let code = tokio::task::spawn_blocking(move || {
        let code = proc.wait_exit(Duration::from_secs(15));
        (code, proc)
    })
    .await
    .expect("join");
    let (code, proc) = code;
    assert_eq!(code, Some(0));
    let logs = proc.logs.lock().expect("lock").clone();
    let line = logs
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["target"] == "access" && v["path"] == "/sse");
    let line = line.unwrap_or_else(|| panic!("no access line for the stream: {logs:#?}"));
    assert_eq!(line["status"], 200);
    assert_eq!(line["sub"], "alice");
}

#[tokio::test]
async fn the_open_connections_gauge_returns_to_zero_however_connections_end() {
    use tokio::io::AsyncWriteExt;
    let backend = echo().await;
    let s = signed(&backend.url(), "", "", "").await;
    let admin = s.proxy.admin_addr;
    let gauge = "txp_open_connections";
    assert_eq!(support::metric(admin, gauge).await, Some(0.0));
    assert!(support::metric(admin, "txp_runtime_tasks").await.is_some());
    // Idle, half a request head, and a whole request kept alive.
    let mut open = Vec::new();
    for head in [
        "",
        "GET /mcp HTTP/1.1\r\nHost: x\r\n",
        "GET /mcp HTTP/1.1\r\nHost: x\r\n\r\n",
    ] {
        let mut c = tokio::net::TcpStream::connect(s.proxy.addr)
            .await
            .expect("connect");
        c.write_all(head.as_bytes()).await.expect("write");
        open.push(c);
    }
    let three = support::eventually(Duration::from_secs(5), async || {
        support::metric(admin, gauge).await == Some(3.0)
    })
    .await;
    assert!(three, "{:?}", support::metric(admin, gauge).await);
    // One reset (SO_LINGER 0), the others closed.
    let first = open.remove(0);
    first.set_zero_linger().expect("linger");
    drop(first);
    drop(open);
    let zero = support::eventually(Duration::from_secs(5), async || {
        support::metric(admin, gauge).await == Some(0.0)
    })
    .await;
    assert!(zero, "{:?}", support::metric(admin, gauge).await);
}
