//! Exchanger behaviour that needs no IdP: failures before and instead of the call.
//! Exchanges against a real token endpoint are in `tests/it/exchange.rs`.

use std::collections::BTreeMap;

use super::*;
use crate::config::{ACCESS_TOKEN_TYPE, ClientAuth, IdpTls};

fn exchange_config(token_endpoint: Option<Url>, client_auth: ClientAuth) -> Exchange {
    Exchange {
        grant: crate::config::Grant::TokenExchange,
        token_endpoint,
        issuer: "http://127.0.0.1:1/realms/test".into(),
        client_id: "txp".into(),
        client_auth,
        audience: vec!["backend".into()],
        resource: vec![],
        scope: Some("notes.read".into()),
        subject_token_type: ACCESS_TOKEN_TYPE.into(),
        requested_token_type: ACCESS_TOKEN_TYPE.into(),
        extra_params: BTreeMap::new(),
        timeout: Duration::from_secs(2),
        max_concurrent: 64,
        negative_ttl: Duration::from_secs(10),
        verify_issued: crate::config::VerifyIssued::Auto,
    }
}

fn cache_config() -> Cache {
    Cache {
        max_entries: 100,
        max_ttl: Duration::from_secs(300),
        expiry_margin: Duration::from_secs(15),
        refresh_ahead: Duration::from_secs(30),
        stale_if_error: true,
    }
}

fn build(
    config: &Exchange,
    options: ExchangerOptions,
) -> (Arc<Exchanger>, Arc<Metrics>, Arc<Readiness>) {
    let metrics = Arc::new(Metrics::default());
    let readiness = Arc::new(Readiness::default());
    let idp = IdpClient::new(&IdpTls {
        ca_file: None,
        allow_plain_http: false,
    })
    .expect("client");
    let ex = Exchanger::with_options(
        config,
        &cache_config(),
        idp,
        metrics.clone(),
        readiness.clone(),
        options,
    )
    .expect("exchanger");
    (Arc::new(ex), metrics, readiness)
}

/// A loopback URL where nothing listens.
async fn closed_port_url() -> Url {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    drop(listener);
    format!("http://{addr}/token").parse().expect("url")
}

#[tokio::test]
async fn an_unreachable_idp_is_unavailable_and_opens_the_circuit() {
    let config = exchange_config(Some(closed_port_url().await), ClientAuth::None);
    let settings = BreakerSettings {
        failure_threshold: 2,
        cool_down: Duration::from_secs(30),
    };
    let (ex, metrics, readiness) = build(
        &config,
        ExchangerOptions {
            breaker: settings,
            ..Default::default()
        },
    );
    assert!(
        readiness.check().is_ok(),
        "a configured endpoint needs no discovery"
    );

    for _ in 0..2 {
        let err = ex.exchange("subject", None).await.expect_err("unreachable");
        assert_eq!(
            err,
            ExchangeError::Unavailable {
                retry_after: response::DEFAULT_RETRY_AFTER
            }
        );
    }
    assert!(matches!(ex.breaker_state(), BreakerState::Open { .. }));
    // Open: answered at once, with the remaining cool-down, without a call.
    let err = ex.exchange("subject", None).await.expect_err("open");
    let ExchangeError::Unavailable { retry_after } = err else {
        panic!("{err:?}")
    };
    assert!(
        retry_after > Duration::from_secs(28) && retry_after <= Duration::from_secs(30),
        "{retry_after:?}"
    );
    assert_eq!(
        metrics.exchange_duration.count(),
        2,
        "no IdP call while open"
    );
    assert_eq!(
        metrics.exchange_requests.get(ExchangeResult::Unavailable),
        3
    );
    assert_eq!(metrics.cache_misses.load(Ordering::Relaxed), 3);
    assert_eq!(metrics.cache_hits.load(Ordering::Relaxed), 0);
    ex.sync().await;
    assert_eq!(ex.entry_count(), 0, "failures are not cached");
}

#[tokio::test]
async fn without_an_endpoint_exchanges_are_unavailable_and_readiness_waits() {
    let config = exchange_config(None, ClientAuth::None);
    let (ex, metrics, readiness) = build(&config, ExchangerOptions::default());
    assert_eq!(readiness.check(), Err("pending: token_endpoint".into()));
    let err = ex.exchange("subject", None).await.expect_err("no endpoint");
    assert_eq!(
        err,
        ExchangeError::Unavailable {
            retry_after: response::DEFAULT_RETRY_AFTER
        }
    );
    assert_eq!(metrics.exchange_duration.count(), 0);
    assert_eq!(
        ex.breaker_state(),
        BreakerState::Closed { failures: 0 },
        "not the IdP's failure"
    );
}

#[tokio::test]
async fn an_unreadable_secret_at_request_time_is_a_client_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "s3cr3t").expect("write");
    let config = exchange_config(
        Some(closed_port_url().await),
        ClientAuth::ClientSecretBasic {
            secret_file: secret.clone(),
        },
    );
    let (ex, metrics, _) = build(&config, ExchangerOptions::default());
    std::fs::remove_file(&secret).expect("remove");
    assert_eq!(
        ex.exchange("subject", None).await.expect_err("no secret"),
        ExchangeError::ClientRejected
    );
    assert_eq!(
        metrics.exchange_requests.get(ExchangeResult::ClientError),
        1
    );
    assert_eq!(
        metrics.exchange_duration.count(),
        0,
        "no call without credentials"
    );
}

#[test]
fn setup_fails_naming_the_key_and_file_but_no_content() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = dir.path().join("key.pem");
    std::fs::write(
        &key,
        "-----BEGIN PRIVATE KEY-----\nc2VjcmV0\n-----END PRIVATE KEY-----\n",
    )
    .expect("write");
    let config = exchange_config(
        None,
        ClientAuth::PrivateKeyJwt {
            private_key_file: key,
            key_id: None,
            certificate_file: None,
        },
    );
    let idp = IdpClient::new(&IdpTls {
        ca_file: None,
        allow_plain_http: false,
    })
    .expect("client");
    let err = Exchanger::new(
        &config,
        &cache_config(),
        idp,
        Arc::default(),
        Arc::default(),
    )
    .expect_err("bad key");
    let msg = err.to_string();
    assert!(msg.starts_with("exchange.client_auth: "), "{msg}");
    assert!(msg.contains("key.pem"), "{msg}");
    assert!(!msg.contains("c2VjcmV0"), "{msg}");
}

/// A token endpoint on loopback that answers one request with `body` (200, JSON), and hands
/// back the request it read.
async fn one_shot_token_endpoint(body: &'static str) -> (Url, tokio::task::JoinHandle<String>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}/token", listener.local_addr().expect("addr"))
        .parse()
        .expect("url");
    let served = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.expect("accept");
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        // Head, then as many body bytes as Content-Length says.
        loop {
            let n = s.read(&mut buf).await.expect("read");
            got.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&got).to_ascii_lowercase();
            if let Some(end) = text.find("\r\n\r\n") {
                let length: usize = text
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                if n == 0 || got.len() >= end + 4 + length {
                    break;
                }
            } else if n == 0 {
                break;
            }
        }
        let answer = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        s.write_all(answer.as_bytes()).await.expect("write");
        String::from_utf8_lossy(&got).into_owned()
    });
    (url, served)
}

#[tokio::test]
async fn debug_output_names_no_secret() {
    const SUBJECT: &str = "subject-token-value";
    const CLIENT_SECRET: &str = "very-secret-value";
    const EXCHANGED: &str = "exchanged-token-value";
    let dir = tempfile::tempdir().expect("tempdir");
    let secret = dir.path().join("secret");
    std::fs::write(&secret, CLIENT_SECRET).expect("write");
    let (endpoint, served) = one_shot_token_endpoint(
        r#"{"access_token":"exchanged-token-value","token_type":"Bearer","issued_token_type":"urn:ietf:params:oauth:token-type:access_token","expires_in":300}"#,
    )
    .await;
    let config = exchange_config(
        Some(endpoint),
        ClientAuth::ClientSecretPost {
            secret_file: secret,
        },
    );
    let (ex, _, _) = build(&config, ExchangerOptions::default());
    // Every secret is in play: the client secret went to the IdP, the exchanged token is in
    // the result and in the cache, and the subject token was the key.
    let exchanged = ex.exchange(SUBJECT, None).await.expect("exchanged");
    let request = served.await.expect("served");
    assert!(
        request.contains(&format!("client_secret={CLIENT_SECRET}")),
        "{request}"
    );
    assert!(
        request.contains(&format!("subject_token={SUBJECT}")),
        "{request}"
    );
    assert_eq!(
        exchanged.authorization.to_str().expect("ascii"),
        format!("Bearer {EXCHANGED}")
    );
    ex.sync().await;
    assert_eq!(ex.entry_count(), 1);

    for (what, text) in [
        ("exchanger", format!("{ex:?}")),
        ("exchanged token", format!("{exchanged:?}")),
    ] {
        for secret in [SUBJECT, CLIENT_SECRET, EXCHANGED] {
            assert!(!text.contains(secret), "{what} shows {secret}: {text}");
        }
    }
    let text = format!("{ex:?}");
    assert!(text.contains("client_secret_post"), "{text}");
    assert!(text.contains("entries: 1"), "{text}");
}
