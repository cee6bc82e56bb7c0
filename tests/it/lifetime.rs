//! Token lifetime (README "Caches, refreshes and the IdP circuit"): refresh ahead of an
//! entry's end, stale tokens while the IdP is unavailable.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use token_exchange_proxy::exchange::{CacheStatus, ExchangeError, ExchangerOptions};
use token_exchange_proxy::metrics::RefreshResult;

use crate::exchange::{basic_exchange, bearer, proxied_with, public_client, setup_with, unix_now};
use crate::support::eventually;
use crate::support::token_endpoint::{Answer, TokenEndpoint};

/// Moves the tokio clock forward by `by`, with no I/O pending meanwhile.
async fn travel(by: Duration) {
    tokio::time::pause();
    tokio::time::advance(by).await;
    tokio::time::resume();
}

#[tokio::test]
async fn a_token_in_steady_use_is_refreshed_once_in_the_background() {
    let idp = TokenEndpoint::start(public_client()).await;
    idp.answer(Answer::issue(60));
    // expires_in 60, margin 15: served for 45 s; refreshed when used from 15 s on.
    let s = setup_with(
        &basic_exchange(&idp, ""),
        "{max_ttl: 300s, expiry_margin: 15s, refresh_ahead: 30s}",
        ExchangerOptions::default(),
    );
    let first = s.exchanger.exchange("t", None).await.expect("exchange");
    assert_eq!(first.cache, CacheStatus::Miss);
    assert_eq!(idp.calls(), 1);

    // Into the refresh window; the IdP now takes 400 ms per exchange.
    travel(Duration::from_secs(20)).await;
    idp.delay(Duration::from_millis(400));
    let mut slowest = Duration::ZERO;
    for _ in 0..20 {
        let started = Instant::now();
        let e = s.exchanger.exchange("t", None).await.expect("exchange");
        slowest = slowest.max(started.elapsed());
        assert_eq!(e.cache, CacheStatus::Hit);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        slowest < Duration::from_millis(200),
        "a request waited for the refresh: {slowest:?}"
    );
    let refreshed = eventually(Duration::from_secs(5), async || {
        s.metrics.exchange_refreshes.get(RefreshResult::Success) == 1
    })
    .await;
    assert!(refreshed, "the refresh did not finish");
    assert_eq!(idp.calls(), 2, "exactly one extra IdP call");

    // Past the first token's window, the refreshed one is served: no further call.
    travel(Duration::from_secs(30)).await;
    let later = s.exchanger.exchange("t", None).await.expect("exchange");
    assert_eq!(later.cache, CacheStatus::Hit);
    assert_ne!(bearer(&later), bearer(&first), "the refreshed token");
    assert_eq!(idp.calls(), 2);
}

#[tokio::test]
async fn no_refresh_when_the_subject_token_bounds_the_entry() {
    let idp = TokenEndpoint::start(public_client()).await;
    idp.answer(Answer::issue(300));
    let s = setup_with(
        &basic_exchange(&idp, ""),
        "{max_ttl: 300s, expiry_margin: 15s, refresh_ahead: 30s}",
        ExchangerOptions::default(),
    );
    // The client token ends in 60 s: a new exchange could not serve any longer.
    let exp = unix_now() + 60;
    s.exchanger
        .exchange("t", Some(exp))
        .await
        .expect("exchange");
    travel(Duration::from_secs(40)).await;
    for _ in 0..5 {
        let e = s
            .exchanger
            .exchange("t", Some(exp))
            .await
            .expect("exchange");
        assert_eq!(e.cache, CacheStatus::Hit);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(idp.calls(), 1);
    assert_eq!(s.metrics.exchange_refreshes.get(RefreshResult::Success), 0);
}

#[tokio::test]
async fn a_failed_refresh_leaves_the_entry_in_place() {
    let idp = TokenEndpoint::start(public_client()).await;
    idp.answer(Answer::issue(60));
    let s = setup_with(
        &basic_exchange(&idp, ""),
        "{max_ttl: 300s, expiry_margin: 15s, refresh_ahead: 30s}",
        ExchangerOptions::default(),
    );
    let first = s.exchanger.exchange("t", None).await.expect("exchange");
    idp.answer(Answer::error(503, None));
    travel(Duration::from_secs(20)).await;
    let e = s.exchanger.exchange("t", None).await.expect("exchange");
    assert_eq!(bearer(&e), bearer(&first));
    let failed = eventually(Duration::from_secs(5), async || {
        s.metrics.exchange_refreshes.get(RefreshResult::Failure) == 1
    })
    .await;
    assert!(failed);
    // Still served, and the refresh is not retried on every request.
    for _ in 0..5 {
        let e = s.exchanger.exchange("t", None).await.expect("exchange");
        assert_eq!(e.cache, CacheStatus::Hit);
        assert_eq!(bearer(&e), bearer(&first));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(idp.calls(), 2);
}

#[tokio::test]
async fn with_the_idp_down_a_stale_token_is_served_until_its_own_end() {
    for stale_if_error in [true, false] {
        let idp = TokenEndpoint::start(public_client()).await;
        idp.answer(Answer::issue(60));
        let s = setup_with(
            &basic_exchange(&idp, ""),
            &format!(
                "{{max_ttl: 300s, expiry_margin: 15s, refresh_ahead: 0s, stale_if_error: {stale_if_error}}}"
            ),
            ExchangerOptions::default(),
        );
        let first = s.exchanger.exchange("t", None).await.expect("exchange");
        idp.answer(Answer::error(503, None));
        // Past the margin (45 s), before the token's end (60 s).
        travel(Duration::from_secs(50)).await;
        let stale = s.exchanger.exchange("t", None).await;
        if stale_if_error {
            let stale = stale.expect("the stale token");
            assert_eq!(stale.cache, CacheStatus::Stale);
            assert_eq!(bearer(&stale), bearer(&first));
            assert_eq!(s.metrics.stale_served.load(Ordering::Relaxed), 1);
        } else {
            assert!(matches!(stale, Err(ExchangeError::Unavailable { .. })));
            assert_eq!(s.metrics.stale_served.load(Ordering::Relaxed), 0);
        }
        // Past the token's own end: never served.
        travel(Duration::from_secs(11)).await;
        let gone = s.exchanger.exchange("t", None).await;
        assert!(
            matches!(gone, Err(ExchangeError::Unavailable { .. })),
            "{gone:?}"
        );
    }
}

#[tokio::test]
async fn a_refusal_of_the_subject_is_never_answered_with_a_stale_token() {
    let idp = TokenEndpoint::start(public_client()).await;
    idp.answer(Answer::issue(60));
    let s = setup_with(
        &basic_exchange(&idp, ""),
        "{max_ttl: 300s, expiry_margin: 15s, refresh_ahead: 0s}",
        ExchangerOptions::default(),
    );
    s.exchanger.exchange("t", None).await.expect("exchange");
    idp.answer(Answer::error(400, Some("invalid_grant")));
    travel(Duration::from_secs(50)).await;
    assert_eq!(
        s.exchanger.exchange("t", None).await.expect_err("refused"),
        ExchangeError::SubjectRejected
    );
}

#[tokio::test]
async fn through_the_proxy_an_idp_outage_is_ridden_out_with_the_stale_token() {
    // Served for 1 s, kept for 3 s.
    let p = proxied_with(None, "", "cache: {expiry_margin: 2s, refresh_ahead: 0s}\n").await;
    p.idp.answer(Answer::issue(3));
    let token = p.token("alice");
    let resp = p.get(&token).await;
    assert_eq!(resp.status(), 200);
    let first = p.echo.last().expect("forwarded").headers["authorization"].clone();
    p.idp.answer(Answer::error(503, None));
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let resp = p.get(&token).await;
    assert_eq!(resp.status(), 200, "the stale token is used");
    assert_eq!(
        p.echo.last().expect("forwarded").headers["authorization"],
        first
    );
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let resp = p.get(&token).await;
    assert_eq!(resp.status(), 503, "never past the token's own end");
    assert!(resp.headers().contains_key("retry-after"));
}

/// Reads `resp` to its end: the complete events (text up to each blank line) and what came
/// after the last one, with the time the body ended.
async fn read_stream(mut resp: reqwest::Response) -> (Vec<String>, String, Instant) {
    let mut text = String::new();
    while let Ok(Some(chunk)) = resp.chunk().await {
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    let ended = Instant::now();
    let mut events: Vec<String> = text.split("\n\n").map(str::to_owned).collect();
    let rest = events.pop().unwrap_or_default();
    (events, rest, ended)
}

#[tokio::test]
async fn an_event_stream_ends_with_its_token_after_a_whole_event_and_a_post_is_not_cut() {
    let backend = crate::support::echo().await;
    // A one-second leeway, and a token that expires in two seconds.
    let s = crate::support::signed(&backend.url(), "", ", leeway: 1s", "").await;
    let exp = unix_now() + 2;
    let token = s.token_with(|c| c["exp"] = serde_json::json!(exp));
    // Both streams would last 5 s: 25 events, 200 ms apart.
    let url = s.url("/sse?n=25&gap_ms=200");
    let opened = Instant::now();
    let get = crate::support::client()
        .get(&url)
        .bearer_auth(&token)
        .send();
    let post = crate::support::client()
        .post(&url)
        .bearer_auth(&token)
        .send();
    let (get, post) = tokio::join!(get, post);
    let (get, post) = (get.expect("get"), post.expect("post"));
    assert_eq!((get.status().as_u16(), post.status().as_u16()), (200, 200));
    let ((get_events, get_rest, get_end), (post_events, post_rest, _)) =
        tokio::join!(read_stream(get), read_stream(post));

    // The GET ended within leeway + 1 s of exp, after a whole event.
    let deadline = std::time::UNIX_EPOCH + Duration::from_secs(exp + 1 + 1);
    let ended_at = std::time::SystemTime::now() - get_end.elapsed();
    assert!(
        ended_at <= deadline,
        "the stream outlived exp + leeway + 1 s"
    );
    assert!(get_end.duration_since(opened) < Duration::from_secs(4));
    assert!(
        !get_events.is_empty() && get_events.len() < 25,
        "{}",
        get_events.len()
    );
    assert_eq!(get_rest, "", "the stream ended inside an event");
    for e in &get_events {
        assert!(e.starts_with("id: ") && e.contains("\ndata: "), "{e:?}");
    }
    // The POST got all of it.
    assert_eq!(post_events.len(), 25);
    assert_eq!(post_rest, "");
    let ended = crate::support::metric(
        s.proxy.admin_addr,
        "txp_streams_ended_total{reason=\"token_expired\"}",
    )
    .await;
    assert_eq!(ended, Some(1.0));
}

#[tokio::test]
async fn an_issued_token_that_fails_verification_is_a_502_and_never_cached() {
    let p = proxied_with(None, "", "").await;
    let good = |p: &crate::exchange::Proxied| {
        let mut c = p.issuer.claims("backend", "notes.read");
        c["sub"] = serde_json::json!("alice");
        c
    };
    let other_key = crate::support::issuer::Key::ec(&p.key.kid);
    let cases: Vec<(&str, String)> = vec![
        ("wrong aud", {
            let mut c = good(&p);
            c["aud"] = serde_json::json!("someone-else");
            p.key.sign(&p.key.header(), &c)
        }),
        (
            "bad signature",
            other_key.sign(&other_key.header(), &good(&p)),
        ),
        ("expired exp", {
            let mut c = good(&p);
            c["exp"] = serde_json::json!(unix_now() - 10);
            p.key.sign(&p.key.header(), &c)
        }),
        ("no exp", {
            let mut c = good(&p);
            c.as_object_mut().map(|o| o.remove("exp"));
            p.key.sign(&p.key.header(), &c)
        }),
        ("wrong iss", {
            let mut c = good(&p);
            c["iss"] = serde_json::json!("https://elsewhere.example");
            p.key.sign(&p.key.header(), &c)
        }),
    ];
    for (what, issued) in cases {
        p.idp.answer(Answer::IssueToken {
            access_token: issued,
            expires_in: Some(300),
        });
        let token = p.token("alice");
        let calls = p.idp.calls();
        for _ in 0..2 {
            let resp = p.get(&token).await;
            assert_eq!(resp.status(), 502, "{what}");
        }
        assert_eq!(p.idp.calls(), calls + 2, "{what}: never cached");
    }
    assert_eq!(p.echo.requests(), 0, "nothing reached the backend");
    // A good one is accepted and cached.
    p.idp.answer(Answer::IssueToken {
        access_token: p.key.sign(&p.key.header(), &good(&p)),
        expires_in: Some(300),
    });
    let token = p.token("alice");
    for _ in 0..2 {
        assert_eq!(p.get(&token).await.status(), 200);
    }
    assert_eq!(p.echo.requests(), 2);
    let invalid = crate::support::metric(
        p.proxy.admin_addr,
        "txp_exchange_requests_total{result=\"invalid_response\"}",
    )
    .await;
    assert_eq!(invalid, Some(10.0));
}

#[tokio::test]
async fn verify_issued_always_refuses_an_opaque_token_and_never_trusts_it_as_is() {
    for (mode, status) in [("always", 502), ("auto", 200), ("never", 200)] {
        let p = proxied_with(None, &format!(", verify_issued: {mode}"), "").await;
        p.idp.answer(Answer::issue(300));
        let resp = p.get(&p.token("alice")).await;
        assert_eq!(resp.status(), status, "{mode} with an opaque issued token");
    }
    // With `never`, even a token for someone else goes through: the IdP's word is taken.
    let p = proxied_with(None, ", verify_issued: never", "").await;
    let mut c = p.issuer.claims("someone-else", "");
    c["sub"] = serde_json::json!("alice");
    p.idp.answer(Answer::IssueToken {
        access_token: p.key.sign(&p.key.header(), &c),
        expires_in: Some(300),
    });
    assert_eq!(p.get(&p.token("alice")).await.status(), 200);
}

/// `POST /cache/purge` on the admin listener with `body`: status and JSON answer.
async fn purge(admin: std::net::SocketAddr, body: &str) -> (u16, serde_json::Value) {
    let resp = crate::support::client()
        .post(format!("http://{admin}/cache/purge"))
        .header("content-type", "application/json")
        .body(body.to_owned())
        .send()
        .await
        .expect("purge");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or_default())
}

#[tokio::test]
async fn purging_a_sub_makes_its_next_request_exchange_again() {
    let p = proxied_with(None, "", "").await;
    let (alice, bob) = (p.token("alice"), p.token("bob"));
    for t in [&alice, &bob] {
        assert_eq!(p.get(t).await.status(), 200);
    }
    assert_eq!(p.idp.calls(), 2);
    let (status, answer) = purge(p.proxy.admin_addr, r#"{"sub": "alice"}"#).await;
    assert_eq!(status, 200);
    assert_eq!(answer["purged"], 1, "alice's exchange");
    // Alice exchanges again; Bob is still cached.
    assert_eq!(p.get(&alice).await.status(), 200);
    assert_eq!(p.get(&bob).await.status(), 200);
    assert_eq!(p.idp.calls(), 3);
    let (status, answer) = purge(p.proxy.admin_addr, r#"{"all": true}"#).await;
    assert_eq!(status, 200);
    assert_eq!(answer["purged"], 2);
    assert_eq!(p.get(&bob).await.status(), 200);
    assert_eq!(p.idp.calls(), 4);
    let purged = crate::support::metric(p.proxy.admin_addr, "txp_cache_purged_total").await;
    assert_eq!(purged, Some(3.0));
    for bad in [
        r#"{}"#,
        r#"{"all": false}"#,
        r#"{"sub": 1}"#,
        r#"{"sub": "a", "all": true}"#,
        "nope",
    ] {
        let (status, _) = purge(p.proxy.admin_addr, bad).await;
        assert_eq!(status, 400, "{bad}");
    }
}

#[tokio::test]
async fn an_opaque_token_found_inactive_is_refused_and_its_exchange_forgotten() {
    let issuer = crate::support::issuer::Issuer::start().await;
    let idp = TokenEndpoint::start(public_client()).await;
    let echo = crate::support::echo().await;
    let proxy = crate::support::proxy(&format!(
        "upstream: {{url: '{}'}}\n\
         inbound: {{issuer: '{iss}', jwks_uri: '{iss}/jwks', audiences: [mcp], introspection: {{endpoint: '{iss}/introspect', client_id: txp}}}}\n\
         exchange: {{token_endpoint: '{}', client_id: txp, client_auth: {{method: none}}, audience: [backend], timeout: 1s}}\n",
        echo.url(),
        idp.url(),
        iss = issuer.url(),
    ))
    .await;
    crate::support::wait_ready(proxy.admin_addr).await;
    let opaque = "opaque-token-of-alice";
    let active = serde_json::json!({
        "active": true, "iss": issuer.url(), "sub": "alice", "aud": "mcp",
        "exp": unix_now() + 600,
    });
    issuer.register_opaque(opaque, active);
    let get = || async {
        crate::support::client()
            .get(format!("http://{}/mcp", proxy.addr))
            .bearer_auth(opaque)
            .send()
            .await
            .expect("request")
            .status()
            .as_u16()
    };
    assert_eq!(get().await, 200);
    assert_eq!(idp.calls(), 1);
    // Revoked at the IdP; once its remembered acceptance is purged, introspection says so.
    issuer.register_opaque(opaque, serde_json::json!({"active": false}));
    let (status, _) = purge(proxy.admin_addr, r#"{"sub": "alice"}"#).await;
    assert_eq!(status, 200);
    assert_eq!(get().await, 401);
    assert_eq!(idp.calls(), 1, "a revoked token is not exchanged");
}

#[tokio::test]
async fn introspection_reporting_a_token_inactive_removes_its_cached_exchange() {
    let issuer = crate::support::issuer::Issuer::start().await;
    let idp = TokenEndpoint::start(public_client()).await;
    let config = crate::support::config_from(&format!(
        "upstream: {{url: 'http://127.0.0.1:9'}}\n\
         inbound: {{issuer: '{iss}', jwks_uri: '{iss}/jwks', audiences: [mcp], introspection: {{endpoint: '{iss}/introspect', client_id: txp}}}}\n\
         exchange: {{token_endpoint: '{}', client_id: txp, client_auth: {{method: none}}, audience: [backend], timeout: 1s}}\n",
        idp.url(),
        iss = issuer.url(),
    ));
    let protection = token_exchange_proxy::Protection::start(&config).expect("protection");
    let exchanger = protection.exchanger().expect("exchange mode").clone();
    let opaque = "opaque-token-of-bob";
    let first = exchanger.exchange(opaque, None).await.expect("exchange");
    let again = exchanger.exchange(opaque, None).await.expect("exchange");
    assert_eq!(
        (first.cache, again.cache),
        (CacheStatus::Miss, CacheStatus::Hit)
    );
    // Introspection now says it is revoked.
    issuer.register_opaque(opaque, serde_json::json!({"active": false}));
    let refused = protection.validator().validate(opaque).await;
    assert!(refused.is_err(), "{refused:?}");
    let after = exchanger.exchange(opaque, None).await.expect("exchange");
    assert_eq!(
        after.cache,
        CacheStatus::Miss,
        "the cached exchange went with it"
    );
    assert_eq!(idp.calls(), 2);
}
