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
