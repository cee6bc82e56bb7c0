//! Token exchange (README "HTTP behaviour", "Caches, refreshes and the IdP circuit"): the exchanger against an in-process
//! token endpoint, and the proxy end to end.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use jsonwebtoken::{Algorithm, DecodingKey};

use token_exchange_proxy::exchange::{
    BreakerSettings, BreakerState, CacheStatus, ExchangeError, Exchanged, Exchanger,
    ExchangerOptions,
};
use token_exchange_proxy::idp::IdpClient;
use token_exchange_proxy::inbound::Principal;
use token_exchange_proxy::metrics::{ExchangeResult, Metrics};
use token_exchange_proxy::readiness::Readiness;

use crate::support::issuer::{Issuer, Key};
use crate::support::token_endpoint::{Answer, ClientAuth, TokenEndpoint};
use crate::support::{Echo, client, config_from, eventually, metric};

/// An exchanger built from the `exchange:` and `cache:` YAML mappings (flow style).
pub(crate) struct Setup {
    pub(crate) exchanger: Arc<Exchanger>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) readiness: Arc<Readiness>,
}

pub(crate) fn setup_with(exchange: &str, cache: &str, options: ExchangerOptions) -> Setup {
    let config = config_from(&format!(
        "upstream: {{url: 'http://127.0.0.1:1'}}\n\
         inbound: {{issuer: 'http://127.0.0.1:1', audiences: [test]}}\n\
         exchange: {exchange}\n\
         cache: {cache}\n"
    ));
    let metrics = Arc::new(Metrics::default());
    let readiness = Arc::new(Readiness::default());
    let idp = IdpClient::new(&config.idp_tls).expect("idp client");
    let exchanger = Exchanger::with_options(
        config.exchange().expect("exchange mode"),
        &config.cache,
        idp,
        metrics.clone(),
        readiness.clone(),
        options,
    )
    .expect("exchanger");
    Setup {
        exchanger: Arc::new(exchanger),
        metrics,
        readiness,
    }
}

/// An exchanger at `idp` authenticating as `client_id` with `client_auth` (a YAML flow map).
fn auth_setup(idp: &TokenEndpoint, client_id: &str, client_auth: &str) -> Setup {
    setup_with(
        &format!(
            "{{token_endpoint: '{}', client_id: '{client_id}', client_auth: {client_auth}}}",
            idp.url()
        ),
        "{}",
        ExchangerOptions::default(),
    )
}

/// A public client `txp` at `idp`, audience `backend`, scope `notes.read`.
pub(crate) fn setup(idp: &TokenEndpoint) -> Setup {
    setup_with(&basic_exchange(idp, ""), "{}", ExchangerOptions::default())
}

pub(crate) fn basic_exchange(idp: &TokenEndpoint, extra: &str) -> String {
    format!(
        "{{token_endpoint: '{}', client_id: txp, client_auth: {{method: none}}, audience: [backend], scope: notes.read, timeout: 2s{extra}}}",
        idp.url()
    )
}

pub(crate) fn public_client() -> ClientAuth {
    ClientAuth::None { id: "txp".into() }
}

pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

pub(crate) fn bearer(e: &Exchanged) -> &str {
    e.authorization.to_str().expect("ascii")
}

// ---------------------------------------------------------------------------------------
// Single flight and the cache
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_misses_for_one_token_make_one_idp_call() {
    let idp = TokenEndpoint::start(public_client()).await;
    // Slow enough that all 200 requests arrive while the first exchange is in flight.
    idp.delay(Duration::from_millis(300));
    let s = setup(&idp);

    let tasks: Vec<_> = (0..200)
        .map(|_| {
            let ex = s.exchanger.clone();
            tokio::spawn(async move { ex.exchange("alice-token", None).await })
        })
        .collect();
    let mut statuses = Vec::new();
    for t in tasks {
        let e = t.await.expect("task").expect("exchange");
        assert_eq!(bearer(&e), "Bearer xt-0");
        assert!(e.authorization.is_sensitive());
        statuses.push(e.cache);
    }
    assert_eq!(
        idp.calls(),
        1,
        "200 concurrent misses must make exactly one IdP call"
    );
    assert_eq!(
        statuses.iter().filter(|c| **c == CacheStatus::Miss).count(),
        1
    );
    let m = &s.metrics;
    assert_eq!(m.cache_misses.load(Ordering::Relaxed), 1);
    assert_eq!(
        m.cache_coalesced.load(Ordering::Relaxed) + m.cache_hits.load(Ordering::Relaxed),
        199
    );

    idp.delay(Duration::ZERO);
    let started = Instant::now();
    for _ in 0..1000 {
        let e = s
            .exchanger
            .exchange("alice-token", None)
            .await
            .expect("exchange");
        assert_eq!(e.cache, CacheStatus::Hit);
        assert_eq!(bearer(&e), "Bearer xt-0");
    }
    let per_hit = started.elapsed() / 1000;
    assert_eq!(
        idp.calls(),
        1,
        "cached: still one IdP call after 1,000 more requests"
    );
    assert_eq!(m.exchange_requests.get(ExchangeResult::Success), 1);
    println!("cache hit: {per_hit:?} per exchange() on average");
}

#[tokio::test]
async fn a_cached_token_is_not_served_after_the_subject_expiry_minus_the_margin() {
    let idp = TokenEndpoint::start(public_client()).await;
    idp.answer(Answer::issue(300));
    // margin 15 s: a subject expiring in 20 s may be served for 5 s at most.
    let s = setup_with(
        &basic_exchange(&idp, ""),
        "{max_ttl: 300s, expiry_margin: 15s}",
        ExchangerOptions::default(),
    );
    let ex = &s.exchanger;
    let exp = unix_now() + 20;

    assert_eq!(
        ex.exchange("short-lived", Some(exp))
            .await
            .expect("exchange")
            .cache,
        CacheStatus::Miss
    );
    assert_eq!(
        ex.exchange("no-exp", None).await.expect("exchange").cache,
        CacheStatus::Miss
    );
    assert_eq!(idp.calls(), 2);

    tokio::time::pause();
    tokio::time::advance(Duration::from_secs(3)).await;
    assert_eq!(
        ex.exchange("short-lived", Some(exp))
            .await
            .expect("exchange")
            .cache,
        CacheStatus::Hit
    );
    tokio::time::advance(Duration::from_millis(2_100)).await;
    // 5.1 s later: within 15 s of the subject's expiry, so not served any more...
    assert_eq!(
        ex.exchange("no-exp", None).await.expect("exchange").cache,
        CacheStatus::Hit,
        "control"
    );
    assert_eq!(idp.calls(), 2);
    tokio::time::resume();
    let again = ex
        .exchange("short-lived", Some(exp))
        .await
        .expect("exchange");
    assert_eq!(
        again.cache,
        CacheStatus::Miss,
        "the cached token was served within the margin"
    );
    assert_eq!(idp.calls(), 3);
    assert_ne!(bearer(&again), "Bearer xt-0");
}

#[tokio::test]
async fn the_issued_token_lifetime_bounds_the_entry() {
    let idp = TokenEndpoint::start(public_client()).await;
    let s = setup_with(
        &basic_exchange(&idp, ""),
        // No refresh ahead: an entry here ends when its token does.
        "{max_ttl: 300s, expiry_margin: 15s, refresh_ahead: 0s}",
        ExchangerOptions::default(),
    );
    let ex = &s.exchanger;
    // expires_in 20: served for 5 s.
    idp.answer(Answer::issue(20));
    ex.exchange("a", None).await.expect("exchange");
    // No expires_in: the issued JWT's exp (now + 20) decides.
    let payload = URL_SAFE_NO_PAD.encode(format!(r#"{{"sub":"b","exp":{}}}"#, unix_now() + 20));
    idp.answer(Answer::IssueToken {
        access_token: format!("eyJhbGciOiJub25lIn0.{payload}.c2ln"),
        expires_in: None,
    });
    ex.exchange("b", None).await.expect("exchange");
    // Neither: max_ttl.
    idp.answer(Answer::IssueToken {
        access_token: "opaque".into(),
        expires_in: None,
    });
    ex.exchange("c", None).await.expect("exchange");
    assert_eq!(idp.calls(), 3);

    tokio::time::pause();
    tokio::time::advance(Duration::from_secs(3)).await;
    for subject in ["a", "b", "c"] {
        assert_eq!(
            ex.exchange(subject, None).await.expect("exchange").cache,
            CacheStatus::Hit,
            "{subject}"
        );
    }
    tokio::time::advance(Duration::from_millis(2_500)).await;
    assert_eq!(
        ex.exchange("c", None).await.expect("exchange").cache,
        CacheStatus::Hit,
        "max_ttl 300 s"
    );
    tokio::time::resume();
    assert_eq!(
        ex.exchange("a", None).await.expect("exchange").cache,
        CacheStatus::Miss,
        "expires_in 20"
    );
    assert_eq!(
        ex.exchange("b", None).await.expect("exchange").cache,
        CacheStatus::Miss,
        "exp in 20 s"
    );
}

#[tokio::test]
async fn an_entry_leaves_the_cache_at_the_end_of_its_lifetime() {
    let idp = TokenEndpoint::start(public_client()).await;
    let s = setup_with(
        &basic_exchange(&idp, ""),
        "{max_ttl: 300s, expiry_margin: 1s}",
        ExchangerOptions::default(),
    );
    s.exchanger.start();
    idp.answer(Answer::issue(2));
    s.exchanger.exchange("short", None).await.expect("exchange");
    idp.answer(Answer::issue(300));
    s.exchanger.exchange("long", None).await.expect("exchange");
    s.exchanger.sync().await;
    assert_eq!(s.exchanger.entry_count(), 2);
    // "short" is served for 1 s and kept for 2 s (its lifetime); then it is gone, with the
    // next turn of the cache's timer wheel.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let gone = eventually(Duration::from_secs(3), async || {
        s.exchanger.sync().await;
        s.exchanger.entry_count() == 1
    })
    .await;
    assert!(gone, "the expired entry is gone");
    assert_eq!(
        s.exchanger
            .exchange("long", None)
            .await
            .expect("exchange")
            .cache,
        CacheStatus::Hit
    );
}

#[tokio::test]
async fn a_token_expiring_within_the_margin_is_used_but_not_cached() {
    let idp = TokenEndpoint::start(public_client()).await;
    let s = setup(&idp);
    let exp = unix_now() + 10; // less than the 15 s margin
    let first = s
        .exchanger
        .exchange("dying", Some(exp))
        .await
        .expect("exchange");
    let second = s
        .exchanger
        .exchange("dying", Some(exp))
        .await
        .expect("exchange");
    assert_eq!(
        (first.cache, second.cache),
        (CacheStatus::Miss, CacheStatus::Miss)
    );
    assert_ne!(bearer(&first), bearer(&second));
    assert_eq!(idp.calls(), 2);
}

#[tokio::test]
async fn the_hot_path_serves_an_entry_only_while_its_acceptance_holds() {
    let idp = TokenEndpoint::start(public_client()).await;
    idp.answer(Answer::issue(300));
    let s = setup(&idp);
    let ex = &s.exchanger;
    let key = ex.key("subject-a");
    assert!(ex.cached(&key, 3).await.is_none(), "nothing cached yet");

    let accepted = Principal {
        sub: Some("alice".into()),
        expires_at: None,
        trusted_until: Some(tokio::time::Instant::now() + Duration::from_secs(60)),
        key_epoch: 3,
        profile: 0,
    };
    let first = ex
        .exchange_keyed("subject-a", &key, &accepted)
        .await
        .expect("exchange");
    assert_eq!(first.cache, CacheStatus::Miss);
    let hit = ex.cached(&key, 3).await.expect("served from the cache");
    assert_eq!(hit.cache, CacheStatus::Hit);
    assert_eq!(hit.sub.as_deref(), Some("alice"));
    assert_eq!(bearer(&hit), bearer(&first));
    assert!(
        ex.cached(&key, 4).await.is_none(),
        "a key was withdrawn since the acceptance"
    );
    let other = ex.key("subject-b");
    assert!(ex.cached(&other, 3).await.is_none(), "another token");

    tokio::time::pause();
    tokio::time::advance(Duration::from_secs(61)).await;
    assert!(
        ex.cached(&key, 3).await.is_none(),
        "the acceptance lapsed: the token must be validated again"
    );
    // Validated again: the cached exchange is kept and rests on the new acceptance.
    let renewed = Principal {
        trusted_until: Some(tokio::time::Instant::now() + Duration::from_secs(60)),
        key_epoch: 4,
        ..accepted
    };
    let again = ex
        .exchange_keyed("subject-a", &key, &renewed)
        .await
        .expect("exchange");
    assert_eq!(again.cache, CacheStatus::Hit);
    assert_eq!(bearer(&again), bearer(&first));
    let hit = ex.cached(&key, 4).await.expect("served again");
    assert_eq!(bearer(&hit), bearer(&first));
    tokio::time::resume();
    assert_eq!(idp.calls(), 1);
    assert_eq!(s.metrics.cache_hits.load(Ordering::Relaxed), 3);
}

#[tokio::test]
async fn an_exchange_without_an_acceptance_is_never_served_by_the_hot_path() {
    let idp = TokenEndpoint::start(public_client()).await;
    let s = setup(&idp);
    s.exchanger
        .exchange("subject", None)
        .await
        .expect("exchange");
    let key = s.exchanger.key("subject");
    assert!(s.exchanger.cached(&key, 0).await.is_none());
    assert_eq!(
        s.exchanger
            .exchange("subject", None)
            .await
            .expect("exchange")
            .cache,
        CacheStatus::Hit,
        "but it is cached"
    );
}

#[tokio::test]
async fn two_users_never_share_an_entry() {
    let idp = TokenEndpoint::start(public_client()).await;
    let s = setup(&idp);
    let alice = s
        .exchanger
        .exchange("alice-token", None)
        .await
        .expect("alice");
    let bob = s.exchanger.exchange("bob-token", None).await.expect("bob");
    assert_ne!(bearer(&alice), bearer(&bob));
    assert_eq!(idp.calls(), 2);
    // Each is served its own token from the cache.
    let alice2 = s
        .exchanger
        .exchange("alice-token", None)
        .await
        .expect("alice");
    let bob2 = s.exchanger.exchange("bob-token", None).await.expect("bob");
    assert_eq!(
        (alice2.cache, bob2.cache),
        (CacheStatus::Hit, CacheStatus::Hit)
    );
    assert_eq!(bearer(&alice2), bearer(&alice));
    assert_eq!(bearer(&bob2), bearer(&bob));
    s.exchanger.sync().await;
    assert_eq!(s.exchanger.entry_count(), 2);
    let subjects: Vec<String> = idp
        .seen()
        .iter()
        .map(|r| r.param("subject_token").expect("subject").to_owned())
        .collect();
    assert_eq!(subjects, ["alice-token", "bob-token"]);
}

#[tokio::test]
async fn different_audience_scope_or_resource_are_different_exchanges() {
    let idp = TokenEndpoint::start(public_client()).await;
    let url = idp.url();
    let variants = [
        ("base", "audience: [backend], scope: notes.read"),
        ("audience", "audience: [calendar], scope: notes.read"),
        ("scope", "audience: [backend], scope: notes.write"),
        (
            "resource",
            "audience: [backend], scope: notes.read, resource: ['https://api.example.com/']",
        ),
    ];
    let mut tokens = Vec::new();
    for (what, params) in variants {
        let s = setup_with(
            &format!(
                "{{token_endpoint: '{url}', client_id: txp, client_auth: {{method: none}}, {params}}}"
            ),
            "{}",
            ExchangerOptions::default(),
        );
        let e = s.exchanger.exchange("alice-token", None).await.expect(what);
        assert_eq!(e.cache, CacheStatus::Miss, "{what}");
        tokens.push(bearer(&e).to_owned());
    }
    assert_eq!(idp.calls(), 4);
    tokens.dedup();
    assert_eq!(tokens.len(), 4);
    let seen = idp.seen();
    assert_eq!(seen[0].params("audience"), ["backend"]);
    assert_eq!(seen[1].params("audience"), ["calendar"]);
    assert_eq!(seen[2].param("scope"), Some("notes.write"));
    assert_eq!(seen[3].params("resource"), ["https://api.example.com/"]);
    for r in &seen {
        assert_eq!(
            r.param("grant_type"),
            Some("urn:ietf:params:oauth:grant-type:token-exchange")
        );
        assert_eq!(
            r.param("subject_token_type"),
            Some("urn:ietf:params:oauth:token-type:access_token")
        );
        assert_eq!(
            r.param("requested_token_type"),
            Some("urn:ietf:params:oauth:token-type:access_token")
        );
    }
}

#[tokio::test]
async fn an_unavailable_idp_is_asked_again_on_the_next_request() {
    let idp = TokenEndpoint::start(public_client()).await;
    let s = setup(&idp);
    idp.answer(Answer::error(503, None));
    assert!(matches!(
        s.exchanger
            .exchange("t", None)
            .await
            .expect_err("unavailable"),
        ExchangeError::Unavailable { .. }
    ));
    idp.answer(Answer::issue(300));
    let e = s.exchanger.exchange("t", None).await.expect("exchange");
    assert_eq!(e.cache, CacheStatus::Miss);
    assert_eq!(idp.calls(), 2);
}

#[tokio::test]
async fn a_refused_subject_token_is_remembered_for_negative_ttl() {
    let idp = TokenEndpoint::start(public_client()).await;
    let s = setup_with(
        &basic_exchange(&idp, ", negative_ttl: 10s"),
        "{}",
        ExchangerOptions::default(),
    );
    for (answer, refusal) in [
        (
            Answer::error(400, Some("invalid_grant")),
            ExchangeError::SubjectRejected,
        ),
        (
            Answer::error(400, Some("invalid_scope")),
            ExchangeError::ScopeRejected {
                scope: Some("notes.read".into()),
            },
        ),
    ] {
        let token = format!("refused-{refusal:?}");
        let calls = idp.calls();
        idp.answer(answer);
        for _ in 0..20 {
            assert_eq!(
                s.exchanger
                    .exchange(&token, None)
                    .await
                    .expect_err("refused"),
                refusal
            );
        }
        assert_eq!(idp.calls(), calls + 1, "twenty retries, one IdP call");
    }
    // Once the refusal is older than negative_ttl, the IdP is asked again.
    idp.answer(Answer::issue(300));
    tokio::time::pause();
    tokio::time::advance(Duration::from_secs(11)).await;
    tokio::time::resume();
    let calls = idp.calls();
    let e = s
        .exchanger
        .exchange("refused-SubjectRejected", None)
        .await
        .expect("exchange");
    assert_eq!(e.cache, CacheStatus::Miss);
    assert_eq!(idp.calls(), calls + 1);
}

#[tokio::test]
async fn with_negative_ttl_zero_every_retry_asks_the_idp() {
    let idp = TokenEndpoint::start(public_client()).await;
    let s = setup_with(
        &basic_exchange(&idp, ", negative_ttl: 0s"),
        "{}",
        ExchangerOptions::default(),
    );
    idp.answer(Answer::error(400, Some("invalid_grant")));
    for _ in 0..3 {
        assert_eq!(
            s.exchanger.exchange("t", None).await.expect_err("refused"),
            ExchangeError::SubjectRejected
        );
    }
    assert_eq!(idp.calls(), 3);
}

#[tokio::test]
async fn a_refusal_of_the_proxy_itself_opens_the_circuit() {
    let idp = TokenEndpoint::start(public_client()).await;
    let s = setup(&idp);
    idp.answer(Answer::error(401, Some("invalid_client")));
    // Every request a different token: none of it is the subject's fault.
    for i in 0..20 {
        let err = s
            .exchanger
            .exchange(&format!("t{i}"), None)
            .await
            .expect_err("refused");
        assert!(
            matches!(
                err,
                ExchangeError::ClientRejected | ExchangeError::Unavailable { .. }
            ),
            "{err:?}"
        );
    }
    assert_eq!(
        idp.calls(),
        token_exchange_proxy::exchange::breaker::DEFAULT_FAILURE_THRESHOLD as usize,
        "a wrong secret reaches the IdP only until the circuit opens"
    );
    assert!(matches!(
        s.exchanger.breaker_state(),
        BreakerState::Open { .. }
    ));
}

#[tokio::test]
async fn the_idps_retry_after_holds_the_circuit_open() {
    let idp = TokenEndpoint::start(public_client()).await;
    let s = setup(&idp);
    idp.answer(Answer::Error {
        status: 503,
        error: None,
        retry_after: Some("120".into()),
    });
    let first = s.exchanger.exchange("a", None).await.expect_err("503");
    assert_eq!(
        first,
        ExchangeError::Unavailable {
            retry_after: Duration::from_secs(120)
        }
    );
    // A different token, at once: the IdP is not asked.
    idp.answer(Answer::issue(300));
    let second = s
        .exchanger
        .exchange("b", None)
        .await
        .expect_err("held open");
    assert!(
        matches!(second, ExchangeError::Unavailable { retry_after } if retry_after > Duration::from_secs(100)),
        "{second:?}"
    );
    assert_eq!(idp.calls(), 1);
    // An hour is clamped to five minutes.
    let idp = TokenEndpoint::start(public_client()).await;
    let s = setup(&idp);
    idp.answer(Answer::Error {
        status: 429,
        error: None,
        retry_after: Some("3600".into()),
    });
    assert_eq!(
        s.exchanger.exchange("a", None).await.expect_err("429"),
        ExchangeError::Unavailable {
            retry_after: Duration::from_secs(300)
        }
    );
}

#[tokio::test]
async fn calls_beyond_max_concurrent_wait_and_the_gauge_counts_them() {
    let idp = TokenEndpoint::start(public_client()).await;
    idp.delay(Duration::from_millis(400));
    let s = setup_with(
        &basic_exchange(&idp, ", max_concurrent: 2"),
        "{}",
        ExchangerOptions::default(),
    );
    let tasks: Vec<_> = (0..6)
        .map(|i| {
            let ex = s.exchanger.clone();
            tokio::spawn(async move { ex.exchange(&format!("t{i}"), None).await })
        })
        .collect();
    let mut peak = 0;
    for _ in 0..100 {
        peak = peak.max(s.metrics.exchange_inflight.load(Ordering::Relaxed));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for t in tasks {
        t.await.expect("task").expect("exchange within the timeout");
    }
    assert_eq!(peak, 2, "never more than max_concurrent calls in flight");
    assert_eq!(s.metrics.exchange_inflight.load(Ordering::Relaxed), 0);
    assert_eq!(idp.calls(), 6);
    // A caller that cannot get a slot within exchange.timeout gets 503.
    idp.delay(Duration::from_secs(3));
    let (late, waited, hog) = late_for_the_only_slot(&idp, "500ms").await;
    let err = late.expect_err("no slot");
    assert!(matches!(err, ExchangeError::Unavailable { .. }), "{err:?}");
    assert!(waited < Duration::from_millis(1500));
    let _ = hog.await;
}

/// With one call slot (`max_concurrent: 1`) and `exchange.timeout: {timeout}`: a first
/// exchange takes the slot, and 50 ms later a second one starts. Returns how the second
/// ended, how long it took, and the first's task.
async fn late_for_the_only_slot(
    idp: &TokenEndpoint,
    timeout: &str,
) -> (
    Result<Exchanged, ExchangeError>,
    Duration,
    tokio::task::JoinHandle<Result<Exchanged, ExchangeError>>,
) {
    let s = setup_with(
        &basic_exchange(idp, ", max_concurrent: 1")
            .replace("timeout: 2s", &format!("timeout: {timeout}")),
        "{}",
        no_breaker(),
    );
    let hog = {
        let ex = s.exchanger.clone();
        tokio::spawn(async move { ex.exchange("hog", None).await })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    let started = Instant::now();
    let late = s.exchanger.exchange("late", None).await;
    (late, started.elapsed(), hog)
}

#[tokio::test]
async fn the_wait_for_a_call_slot_counts_against_exchange_timeout() {
    // One slot, taken by a call the IdP answers after 700 ms; a second caller waits for it
    // 650 ms, and then has 350 ms of its 1 s left for its own call, which the IdP answers
    // after 700 ms: it gets 503 at 1 s, not its answer at 1.35 s.
    let idp = TokenEndpoint::start(public_client()).await;
    idp.delay(Duration::from_millis(700));
    let (late, waited, hog) = late_for_the_only_slot(&idp, "1s").await;
    let err = late.expect_err("out of time");
    assert!(matches!(err, ExchangeError::Unavailable { .. }), "{err:?}");
    assert!(
        waited < Duration::from_millis(1300),
        "waited {waited:?} for a 1 s exchange.timeout"
    );
    hog.await
        .expect("task")
        .expect("the first call is answered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_is_shared_by_the_callers_waiting_for_it_then_retried() {
    let idp = TokenEndpoint::start(public_client()).await;
    idp.delay(Duration::from_millis(300));
    idp.answer(Answer::error(503, None));
    let s = setup(&idp);
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let ex = s.exchanger.clone();
            tokio::spawn(async move { ex.exchange("t", None).await })
        })
        .collect();
    for t in tasks {
        assert!(matches!(
            t.await.expect("task").expect_err("unavailable"),
            ExchangeError::Unavailable { .. }
        ));
    }
    assert_eq!(idp.calls(), 1, "one call for 50 concurrent misses");

    idp.delay(Duration::ZERO);
    idp.answer(Answer::issue(300));
    let e = s.exchanger.exchange("t", None).await.expect("exchange");
    assert_eq!(e.cache, CacheStatus::Miss, "the failure was not kept");
    assert_eq!(idp.calls(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_cancelled_while_they_wait_leave_the_others_their_answer() {
    let idp = TokenEndpoint::start(public_client()).await;
    idp.delay(Duration::from_millis(300));
    let s = setup(&idp);
    let first = {
        let ex = s.exchanger.clone();
        tokio::spawn(async move { ex.exchange("t", None).await })
    };
    for _ in 0..200 {
        if idp.calls() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(idp.calls(), 1, "the first caller is at the IdP");
    let waiters: Vec<_> = (0..40)
        .map(|_| {
            let ex = s.exchanger.clone();
            tokio::spawn(async move { ex.exchange("t", None).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(30)).await;
    // Half of the waiters go away at once (clients disconnecting), while the call runs.
    let (gone, staying): (Vec<_>, Vec<_>) = waiters
        .into_iter()
        .enumerate()
        .partition(|(i, _)| i % 2 == 0);
    for (_, w) in &gone {
        w.abort();
    }
    for (_, w) in staying {
        let e = tokio::time::timeout(Duration::from_secs(5), w)
            .await
            .expect("no waiter is left hanging")
            .expect("task")
            .expect("exchange");
        assert_eq!(e.cache, CacheStatus::Coalesced);
    }
    let e = first.await.expect("task").expect("exchange");
    assert_eq!(e.cache, CacheStatus::Miss);
    assert_eq!(idp.calls(), 1, "cancelled waiters cause no second call");
    for (_, w) in gone {
        assert!(w.await.expect_err("aborted").is_cancelled());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_caller_running_an_exchange_goes_away_a_waiter_runs_it() {
    let idp = TokenEndpoint::start(public_client()).await;
    idp.delay(Duration::from_millis(200));
    let s = setup(&idp);
    let first = {
        let ex = s.exchanger.clone();
        tokio::spawn(async move { ex.exchange("t", None).await })
    };
    for _ in 0..200 {
        if idp.calls() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(idp.calls(), 1, "the first caller is at the IdP");
    let waiter = {
        let ex = s.exchanger.clone();
        tokio::spawn(async move { ex.exchange("t", None).await })
    };
    tokio::time::sleep(Duration::from_millis(20)).await;
    first.abort();
    let e = tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .expect("the waiter is not left hanging")
        .expect("task")
        .expect("exchange");
    assert_eq!(e.cache, CacheStatus::Miss, "the waiter made its own call");
    assert_eq!(idp.calls(), 2);
    let e = s.exchanger.exchange("t", None).await.expect("exchange");
    assert_eq!(e.cache, CacheStatus::Hit);
    assert_eq!(idp.calls(), 2);
}

// ---------------------------------------------------------------------------------------
// Client authentication, checked by the IdP
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn client_secret_basic_is_form_encoded_and_verified() {
    let dir = tempfile::tempdir().expect("tempdir");
    let secret_file = dir.path().join("secret");
    let (id, secret) = ("txp:client/1", "p@ss:w%rd+ é&=");
    std::fs::write(&secret_file, format!("{secret}\n")).expect("write");
    let idp = TokenEndpoint::start(ClientAuth::Basic {
        id: id.into(),
        secret: secret.into(),
    })
    .await;
    let s = auth_setup(
        &idp,
        id,
        &format!(
            "{{method: client_secret_basic, secret_file: '{}'}}",
            secret_file.display()
        ),
    );
    s.exchanger
        .exchange("t1", None)
        .await
        .expect("basic auth accepted");
    let header = idp.last().authorization.expect("Authorization");
    let decoded = String::from_utf8(
        STANDARD
            .decode(header.strip_prefix("Basic ").expect("basic"))
            .expect("b64"),
    )
    .expect("utf8");
    assert_eq!(decoded, "txp%3Aclient%2F1:p%40ss%3Aw%25rd%2B+%C3%A9%26%3D");
    assert!(idp.last().param("client_secret").is_none());

    // The secret file is re-read when it changes; the IdP refuses the old secret.
    std::fs::write(&secret_file, "rotated-secret-value\n").expect("write");
    assert_eq!(
        s.exchanger
            .exchange("t2", None)
            .await
            .expect_err("old secret at the IdP"),
        ExchangeError::ClientRejected
    );
    idp.expect_auth(ClientAuth::Basic {
        id: id.into(),
        secret: "rotated-secret-value".into(),
    });
    s.exchanger
        .exchange("t3", None)
        .await
        .expect("rotated secret accepted");
}

#[tokio::test]
async fn client_secret_post_is_verified() {
    let dir = tempfile::tempdir().expect("tempdir");
    let secret_file = dir.path().join("secret");
    std::fs::write(&secret_file, "s3cr3t").expect("write");
    let idp = TokenEndpoint::start(ClientAuth::Post {
        id: "txp".into(),
        secret: "s3cr3t".into(),
    })
    .await;
    let s = auth_setup(
        &idp,
        "txp",
        &format!(
            "{{method: client_secret_post, secret_file: '{}'}}",
            secret_file.display()
        ),
    );
    s.exchanger
        .exchange("t", None)
        .await
        .expect("post auth accepted");
    assert!(idp.last().authorization.is_none());
    // Negative control: the IdP does check.
    idp.expect_auth(ClientAuth::Post {
        id: "txp".into(),
        secret: "other".into(),
    });
    assert_eq!(
        s.exchanger
            .exchange("t2", None)
            .await
            .expect_err("wrong secret"),
        ExchangeError::ClientRejected
    );
    assert_eq!(
        s.metrics.exchange_requests.get(ExchangeResult::ClientError),
        1
    );
}

fn pem(label: &str, der: &[u8]) -> String {
    let b64 = STANDARD.encode(der);
    let lines: Vec<String> = b64
        .as_bytes()
        .chunks(64)
        .map(|c| String::from_utf8_lossy(c).into_owned())
        .collect();
    format!(
        "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
        lines.join("\n")
    )
}

#[tokio::test]
async fn private_key_jwt_assertions_verify_against_the_public_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key_file = dir.path().join("key.pem");
    let pkcs8 =
        EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &SystemRandom::new())
            .expect("key");
    let pair =
        EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref()).expect("key");
    std::fs::write(&key_file, pem("PRIVATE KEY", pkcs8.as_ref())).expect("write");
    let public = DecodingKey::from_ec_der(pair.public_key().as_ref());
    let idp = TokenEndpoint::start(ClientAuth::PrivateKeyJwt {
        id: "txp".into(),
        key: public,
        alg: Algorithm::ES256,
    })
    .await;
    let s = auth_setup(
        &idp,
        "txp",
        &format!(
            "{{method: private_key_jwt, private_key_file: '{}', key_id: k1}}",
            key_file.display()
        ),
    );
    // Two exchanges: the IdP refuses a replayed jti, so each assertion must be fresh.
    s.exchanger
        .exchange("t1", None)
        .await
        .expect("assertion accepted");
    s.exchanger
        .exchange("t2", None)
        .await
        .expect("second assertion accepted");
    let header =
        jsonwebtoken::decode_header(idp.last().param("client_assertion").expect("assertion"))
            .expect("header");
    assert_eq!(header.kid.as_deref(), Some("k1"));
    assert_eq!(header.alg, Algorithm::ES256);

    // A new key in the file is used from the next request; the IdP still trusts the old one.
    let other =
        EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &SystemRandom::new())
            .expect("key");
    std::fs::write(
        &key_file,
        format!("{}\n", pem("PRIVATE KEY", other.as_ref())),
    )
    .expect("write");
    assert_eq!(
        s.exchanger
            .exchange("t3", None)
            .await
            .expect_err("unknown key"),
        ExchangeError::ClientRejected
    );
}

#[tokio::test]
async fn private_key_jwt_with_rsa_is_rs256() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key_file = dir.path().join("key.pem");
    let pair = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).expect("rsa");
    std::fs::write(
        &key_file,
        pem("PRIVATE KEY", pair.as_der().expect("pkcs8").as_ref()),
    )
    .expect("write");
    let public = DecodingKey::from_rsa_der(pair.public_key().as_ref());
    let idp = TokenEndpoint::start(ClientAuth::PrivateKeyJwt {
        id: "txp".into(),
        key: public,
        alg: Algorithm::RS256,
    })
    .await;
    let s = auth_setup(
        &idp,
        "txp",
        &format!(
            "{{method: private_key_jwt, private_key_file: '{}'}}",
            key_file.display()
        ),
    );
    s.exchanger
        .exchange("t", None)
        .await
        .expect("RS256 assertion accepted");
}

#[tokio::test]
async fn the_client_assertion_file_is_read_again_after_it_changes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("token");
    std::fs::write(&file, "projected.sa.token-1\n").expect("write");
    let idp = TokenEndpoint::start(ClientAuth::AssertionFile {
        id: "txp".into(),
        path: file.clone(),
    })
    .await;
    let s = auth_setup(
        &idp,
        "txp",
        &format!(
            "{{method: client_assertion_file, assertion_file: '{}'}}",
            file.display()
        ),
    );
    s.exchanger
        .exchange("t1", None)
        .await
        .expect("assertion accepted");
    assert_eq!(
        idp.last().param("client_assertion"),
        Some("projected.sa.token-1")
    );
    // The kubelet rotates the token (same length, same second): the next exchange sends the new one.
    std::fs::write(&file, "projected.sa.token-2\n").expect("write");
    s.exchanger
        .exchange("t2", None)
        .await
        .expect("rotated assertion accepted");
    assert_eq!(
        idp.last().param("client_assertion"),
        Some("projected.sa.token-2")
    );
}

#[tokio::test]
async fn a_public_client_sends_only_its_id() {
    let idp = TokenEndpoint::start(public_client()).await;
    let s = setup(&idp);
    s.exchanger.exchange("t", None).await.expect("exchange");
    let r = idp.last();
    assert_eq!(r.param("client_id"), Some("txp"));
    assert!(
        r.authorization.is_none()
            && r.param("client_secret").is_none()
            && r.param("client_assertion").is_none()
    );
}

// ---------------------------------------------------------------------------------------
// Failure mapping and the circuit breaker
// ---------------------------------------------------------------------------------------

/// Threshold high enough that the breaker stays out of the way.
fn no_breaker() -> ExchangerOptions {
    ExchangerOptions {
        breaker: BreakerSettings {
            failure_threshold: 1000,
            cool_down: Duration::from_secs(1),
        },
        ..Default::default()
    }
}

#[tokio::test]
async fn idp_answers_map_to_whose_fault_it_is() {
    let idp = TokenEndpoint::start(public_client()).await;
    let s = setup_with(&basic_exchange(&idp, ""), "{}", no_breaker());
    let unavailable = |secs| ExchangeError::Unavailable {
        retry_after: Duration::from_secs(secs),
    };
    let cases = [
        (
            Answer::error(400, Some("invalid_grant")),
            ExchangeError::SubjectRejected,
            ExchangeResult::Rejected,
        ),
        (
            Answer::error(400, Some("invalid_target")),
            ExchangeError::SubjectRejected,
            ExchangeResult::Rejected,
        ),
        (
            Answer::error(400, Some("invalid_scope")),
            ExchangeError::ScopeRejected {
                scope: Some("notes.read".into()),
            },
            ExchangeResult::Rejected,
        ),
        (
            Answer::error(401, Some("invalid_client")),
            ExchangeError::ClientRejected,
            ExchangeResult::ClientError,
        ),
        (
            Answer::error(400, Some("unauthorized_client")),
            ExchangeError::ClientRejected,
            ExchangeResult::ClientError,
        ),
        (
            Answer::error(403, None),
            ExchangeError::ClientRejected,
            ExchangeResult::ClientError,
        ),
        (
            Answer::error(500, None),
            unavailable(5),
            ExchangeResult::Unavailable,
        ),
        (
            Answer::error(503, None),
            unavailable(5),
            ExchangeResult::Unavailable,
        ),
        (
            Answer::error(429, Some("slow_down")),
            unavailable(5),
            ExchangeResult::Unavailable,
        ),
        // The exchange outcomes: access_denied, and any 401/403 whatever the code, refuse the proxy.
        (
            Answer::error(400, Some("access_denied")),
            ExchangeError::ClientRejected,
            ExchangeResult::ClientError,
        ),
        (
            Answer::error(401, Some("invalid_grant")),
            ExchangeError::ClientRejected,
            ExchangeResult::ClientError,
        ),
        (
            Answer::error(403, Some("invalid_scope")),
            ExchangeError::ClientRejected,
            ExchangeResult::ClientError,
        ),
        (
            Answer::Garbage,
            ExchangeError::InvalidResponse,
            ExchangeResult::InvalidResponse,
        ),
        (
            Answer::Issue {
                expires_in: Some(300),
                token_type: "N_A",
                issued_token_type: None,
            },
            ExchangeError::InvalidResponse,
            ExchangeResult::InvalidResponse,
        ),
        (
            Answer::Issue {
                expires_in: Some(300),
                token_type: "Bearer",
                issued_token_type: Some("urn:ietf:params:oauth:token-type:id_token"),
            },
            ExchangeError::InvalidResponse,
            ExchangeResult::InvalidResponse,
        ),
    ];
    for (i, (answer, want, result)) in cases.into_iter().enumerate() {
        idp.answer(answer.clone());
        let before = s.metrics.exchange_requests.get(result);
        let got = s
            .exchanger
            .exchange(&format!("subject-{i}"), None)
            .await
            .expect_err("failure");
        assert_eq!(got, want, "{answer:?}");
        assert_eq!(
            s.metrics.exchange_requests.get(result),
            before + 1,
            "{answer:?}"
        );
    }
    assert_eq!(idp.calls(), 15);
    assert_eq!(s.metrics.exchange_duration.count(), 15);
}

#[tokio::test]
async fn an_idp_slower_than_the_timeout_is_unavailable() {
    let idp = TokenEndpoint::start(public_client()).await;
    idp.delay(Duration::from_secs(3));
    let s = setup_with(
        &basic_exchange(&idp, "").replace("timeout: 2s", "timeout: 300ms"),
        "{}",
        no_breaker(),
    );
    let started = Instant::now();
    let err = s.exchanger.exchange("t", None).await.expect_err("timeout");
    let took = started.elapsed();
    assert_eq!(
        err,
        ExchangeError::Unavailable {
            retry_after: Duration::from_secs(5)
        }
    );
    assert!(
        took >= Duration::from_millis(290) && took < Duration::from_secs(1),
        "took {took:?}"
    );
}

#[tokio::test]
async fn an_unreachable_idp_is_unavailable() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    drop(listener);
    let s = setup_with(
        &format!(
            "{{token_endpoint: 'http://{addr}/token', client_id: txp, client_auth: {{method: none}}}}"
        ),
        "{}",
        no_breaker(),
    );
    let err = s.exchanger.exchange("t", None).await.expect_err("down");
    assert_eq!(
        err,
        ExchangeError::Unavailable {
            retry_after: Duration::from_secs(5)
        }
    );
}

#[tokio::test]
async fn the_circuit_opens_after_consecutive_failures_and_closes_after_a_good_probe() {
    let idp = TokenEndpoint::start(public_client()).await;
    let cool_down = Duration::from_millis(400);
    let options = ExchangerOptions {
        breaker: BreakerSettings {
            failure_threshold: 3,
            cool_down,
        },
        ..Default::default()
    };
    let s = setup_with(&basic_exchange(&idp, ""), "{}", options);
    let ex = &s.exchanger;
    idp.answer(Answer::error(503, None));

    for i in 0..3 {
        ex.exchange(&format!("s{i}"), None).await.expect_err("503");
    }
    assert_eq!(idp.calls(), 3);
    assert!(matches!(ex.breaker_state(), BreakerState::Open { .. }));
    // Open: answered at once, no call, Retry-After = the remaining cool-down in whole seconds.
    let started = Instant::now();
    let err = ex.exchange("s3", None).await.expect_err("open");
    assert!(started.elapsed() < Duration::from_millis(50));
    assert_eq!(
        err,
        ExchangeError::Unavailable {
            retry_after: Duration::from_secs(1)
        }
    );
    assert_eq!(idp.calls(), 3, "no call while the circuit is open");

    // Half-open: one probe; it fails, so the circuit reopens.
    tokio::time::sleep(cool_down + Duration::from_millis(50)).await;
    ex.exchange("s4", None).await.expect_err("probe fails");
    assert_eq!(idp.calls(), 4);
    ex.exchange("s5", None).await.expect_err("reopened");
    assert_eq!(idp.calls(), 4, "a failed probe reopens the circuit");

    // Half-open again, with the IdP back: exactly one of several concurrent requests probes.
    tokio::time::sleep(cool_down + Duration::from_millis(50)).await;
    idp.answer(Answer::issue(300));
    idp.delay(Duration::from_millis(200));
    let tasks: Vec<_> = (0..5)
        .map(|i| {
            let ex = ex.clone();
            tokio::spawn(async move { ex.exchange(&format!("p{i}"), None).await })
        })
        .collect();
    let mut ok = 0;
    for t in tasks {
        match t.await.expect("task") {
            Ok(_) => ok += 1,
            Err(e) => assert_eq!(
                e,
                ExchangeError::Unavailable {
                    retry_after: Duration::from_secs(1)
                }
            ),
        }
    }
    assert_eq!((ok, idp.calls()), (1, 5), "exactly one probe");
    assert_eq!(ex.breaker_state(), BreakerState::Closed { failures: 0 });
    idp.delay(Duration::ZERO);
    ex.exchange("after", None).await.expect("closed again");
    assert_eq!(idp.calls(), 6);
}

#[tokio::test]
async fn rejections_do_not_open_the_circuit() {
    let idp = TokenEndpoint::start(public_client()).await;
    let options = ExchangerOptions {
        breaker: BreakerSettings {
            failure_threshold: 2,
            cool_down: Duration::from_secs(60),
        },
        ..Default::default()
    };
    let s = setup_with(&basic_exchange(&idp, ""), "{}", options);
    idp.answer(Answer::error(400, Some("invalid_grant")));
    for i in 0..5 {
        s.exchanger
            .exchange(&format!("s{i}"), None)
            .await
            .expect_err("rejected");
    }
    assert_eq!(idp.calls(), 5);
    assert_eq!(
        s.exchanger.breaker_state(),
        BreakerState::Closed { failures: 0 }
    );
}

// ---------------------------------------------------------------------------------------
// Discovery
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn the_token_endpoint_is_discovered_and_readiness_waits_for_it() {
    let idp = TokenEndpoint::start(public_client()).await;
    let s = setup_with(
        &format!(
            "{{issuer: '{}', client_id: txp, client_auth: {{method: none}}}}",
            idp.issuer()
        ),
        "{}",
        ExchangerOptions {
            discovery_retry: Duration::from_millis(50),
            ..Default::default()
        },
    );
    assert_eq!(s.readiness.check(), Err("pending: token_endpoint".into()));
    assert!(matches!(
        s.exchanger.exchange("t", None).await,
        Err(ExchangeError::Unavailable { .. })
    ));
    s.exchanger.start();
    let ready = eventually(Duration::from_secs(5), async || s.readiness.check().is_ok()).await;
    assert!(ready, "token endpoint discovered");
    assert_eq!(
        s.exchanger.token_endpoint().map(|u| u.as_str().to_owned()),
        Some(idp.url())
    );
    s.exchanger
        .exchange("t", None)
        .await
        .expect("exchange after discovery");
}

#[tokio::test]
async fn discovery_is_retried_until_the_idp_answers() {
    let idp = TokenEndpoint::start(public_client()).await;
    idp.discovery_available(false);
    let s = setup_with(
        &format!(
            "{{issuer: '{}', client_id: txp, client_auth: {{method: none}}}}",
            idp.issuer()
        ),
        "{}",
        ExchangerOptions {
            discovery_retry: Duration::from_millis(20),
            ..Default::default()
        },
    );
    s.exchanger.start();
    let retried = eventually(Duration::from_secs(5), async || idp.discovery_calls() >= 3).await;
    assert!(retried, "discovery is retried");
    assert_eq!(s.readiness.check(), Err("pending: token_endpoint".into()));
    idp.discovery_available(true);
    let ready = eventually(Duration::from_secs(5), async || s.readiness.check().is_ok()).await;
    assert!(ready, "discovered once the IdP answers");
    s.exchanger
        .exchange("t", None)
        .await
        .expect("exchange after discovery");
}

/// Never in an error's text: the subject token, a secret, the IdP's error description.
#[tokio::test]
async fn errors_carry_no_token_or_idp_text() {
    const CLIENT_SECRET: &str = "client-secret-value-9f2";
    let dir = tempfile::tempdir().expect("tempdir");
    let secret_file = dir.path().join("secret");
    std::fs::write(&secret_file, CLIENT_SECRET).expect("write");
    let post = |secret: &str| ClientAuth::Post {
        id: "txp".into(),
        secret: secret.into(),
    };
    let idp = TokenEndpoint::start(post(CLIENT_SECRET)).await;
    let s = setup_with(
        &format!(
            "{{token_endpoint: '{}', client_id: txp, client_auth: {{method: client_secret_post, secret_file: '{}'}}, timeout: 2s}}",
            idp.url(),
            secret_file.display()
        ),
        "{}",
        no_breaker(),
    );
    // What the IdP says besides its `error` code: the error_description of every error answer,
    // the body of an unusable answer, the description of a client authentication failure.
    let idp_text = [
        "must not pass on",
        "s3cr3t",
        "maintenance",
        "client authentication failed",
    ];
    let cases = [
        (
            Answer::error(400, Some("invalid_grant")),
            None,
            ExchangeError::SubjectRejected,
        ),
        (
            Answer::error(400, Some("invalid_scope")),
            None,
            ExchangeError::ScopeRejected { scope: None },
        ),
        (
            Answer::error(503, None),
            None,
            ExchangeError::Unavailable {
                retry_after: Duration::from_secs(5),
            },
        ),
        (Answer::Garbage, None, ExchangeError::InvalidResponse),
        (
            Answer::issue(300),
            Some("another-secret"),
            ExchangeError::ClientRejected,
        ),
    ];
    for (i, (answer, idp_expects, expected)) in cases.into_iter().enumerate() {
        idp.answer(answer.clone());
        idp.expect_auth(post(idp_expects.unwrap_or(CLIENT_SECRET)));
        let subject = format!("subject-token-value-{i}");
        let err = s
            .exchanger
            .exchange(&subject, None)
            .await
            .expect_err("refused");
        assert_eq!(
            std::mem::discriminant(&err),
            std::mem::discriminant(&expected),
            "{answer:?}: {err:?}"
        );
        // The secrets were in play: the IdP received both.
        let seen = idp.last();
        assert_eq!(seen.param("subject_token"), Some(subject.as_str()));
        assert_eq!(seen.param("client_secret"), Some(CLIENT_SECRET));
        let text = format!("{err} {err:?}");
        for leak in [subject.as_str(), CLIENT_SECRET].iter().chain(&idp_text) {
            assert!(
                !text.contains(leak),
                "{answer:?}: the error shows {leak:?}: {text}"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------
// Through the proxy: issuer + token endpoint + echo backend, the proxy in-process
// ---------------------------------------------------------------------------------------

pub(crate) const AUDIENCE: &str = "mcp-server";

/// A proxy in exchange mode in front of `echo`, trusting `issuer`, exchanging at `idp`.
pub(crate) struct Proxied {
    /// One client for every request: building a client loads the trust store (tens of ms).
    pub(crate) http: reqwest::Client,
    pub(crate) issuer: Issuer,
    pub(crate) key: Key,
    pub(crate) idp: TokenEndpoint,
    pub(crate) echo: Echo,
    pub(crate) proxy: token_exchange_proxy::server::Running,
}

async fn proxied(idp_url: Option<String>, exchange_extra: &str) -> Proxied {
    proxied_with(idp_url, exchange_extra, "").await
}

/// [`proxied`], with `top` appended to the config at the top level (e.g. a `cache:` section).
pub(crate) async fn proxied_with(
    idp_url: Option<String>,
    exchange_extra: &str,
    top: &str,
) -> Proxied {
    let issuer = Issuer::start().await;
    let key = Key::ec("k1");
    issuer.publish(&[&key]);
    let idp = TokenEndpoint::start(public_client()).await;
    let echo = crate::support::echo().await;
    let yaml = format!(
        "upstream: {{url: '{}'}}\n\
         inbound: {{issuer: '{}', audiences: [{AUDIENCE}]}}\n\
         exchange: {{token_endpoint: '{}', client_id: txp, client_auth: {{method: none}}, audience: [backend], scope: notes.read, timeout: 1s{exchange_extra}}}\n{top}",
        echo.url(),
        issuer.url(),
        idp_url.unwrap_or_else(|| idp.url()),
    );
    let proxy = crate::support::proxy(&yaml).await;
    let admin = proxy.admin_addr;
    let ready = eventually(Duration::from_secs(15), async || {
        let r = client().get(format!("http://{admin}/readyz")).send().await;
        r.is_ok_and(|r| r.status() == 200)
    })
    .await;
    assert!(ready, "proxy never became ready");
    Proxied {
        http: client(),
        issuer,
        key,
        idp,
        echo,
        proxy,
    }
}

impl Proxied {
    /// A fresh valid client token for `sub` (unique `jti`, so never cached before).
    pub(crate) fn token(&self, sub: &str) -> String {
        let mut claims = self.issuer.claims(AUDIENCE, "notes.read");
        claims["sub"] = sub.into();
        self.key.sign(&self.key.header(), &claims)
    }

    pub(crate) async fn get(&self, token: &str) -> reqwest::Response {
        self.http
            .get(format!("http://{}/mcp", self.proxy.addr))
            .header("authorization", format!("Bearer {token}"))
            .send()
            .await
            .expect("request")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_the_proxy_one_client_token_makes_one_exchange() {
    let p = proxied(None, "").await;
    p.idp.delay(Duration::from_millis(300));
    let token = p.token("alice");
    let p = Arc::new(p);

    let tasks: Vec<_> = (0..200)
        .map(|_| {
            let (p, token) = (p.clone(), token.clone());
            tokio::spawn(async move {
                let resp = p.get(&token).await;
                (
                    resp.status().as_u16(),
                    resp.text().await.unwrap_or_default(),
                )
            })
        })
        .collect();
    for t in tasks {
        let (status, body) = t.await.expect("task");
        assert_eq!(status, 200, "{body}");
    }
    assert_eq!(
        p.idp.calls(),
        1,
        "200 concurrent requests with one new token: one exchange"
    );

    p.idp.delay(Duration::ZERO);
    let started = Instant::now();
    for _ in 0..1000 {
        assert_eq!(p.get(&token).await.status(), 200);
    }
    let per_request = started.elapsed() / 1000;
    assert_eq!(p.idp.calls(), 1, "1,000 more requests: still one exchange");
    assert_eq!(p.echo.requests(), 1200);
    let admin = p.proxy.admin_addr;
    assert_eq!(
        metric(admin, "txp_exchange_requests_total{result=\"success\"}").await,
        Some(1.0)
    );
    assert_eq!(
        metric(admin, "txp_exchange_cache_misses_total").await,
        Some(1.0)
    );
    let hits = metric(admin, "txp_exchange_cache_hits_total")
        .await
        .expect("hits");
    let coalesced = metric(admin, "txp_exchange_cache_coalesced_total")
        .await
        .expect("coalesced");
    assert_eq!(hits + coalesced, 1199.0);
    assert_eq!(metric(admin, "txp_exchange_cache_entries").await, Some(1.0));
    println!(
        "sequential cached request through the proxy: {per_request:?} on average (debug build)"
    );
}

#[tokio::test]
async fn through_the_proxy_a_withdrawn_key_ends_the_cached_exchanges_it_signed() {
    let p = proxied(None, "").await;
    let token = p.token("alice");
    for _ in 0..3 {
        assert_eq!(p.get(&token).await.status(), 200);
    }
    assert_eq!(p.idp.calls(), 1, "served from the cache");

    // The issuer replaces its key; the first token signed with the new one makes the proxy
    // fetch the key set, in which the old key is gone.
    let new = Key::ec("k2");
    p.issuer.publish(&[&new]);
    let mut claims = p.issuer.claims(AUDIENCE, "notes.read");
    claims["sub"] = "bob".into();
    assert_eq!(p.get(&new.sign(&new.header(), &claims)).await.status(), 200);

    let resp = p.get(&token).await;
    assert_eq!(
        resp.status(),
        401,
        "alice's exchanged token is not served any more"
    );
    assert_eq!(p.idp.calls(), 2, "bob's exchange only");
    assert_eq!(p.echo.requests(), 4);
    assert_eq!(
        metric(
            p.proxy.admin_addr,
            "txp_token_rejections_total{reason=\"unknown_key\"}"
        )
        .await,
        Some(1.0)
    );
}

#[tokio::test]
async fn the_backend_never_sees_the_client_token() {
    let p = proxied(None, "").await;
    let alice = p.token("alice");
    let bob = p.token("bob");
    for token in [&alice, &bob, &alice, &bob] {
        let resp = p
            .http
            .post(format!("http://{}/mcp?x=1", p.proxy.addr))
            .header("authorization", format!("Bearer {token}"))
            .header("proxy-authorization", format!("Bearer {token}"))
            .header("connection", "keep-alive")
            .body("{}")
            .send()
            .await
            .expect("request");
        assert_eq!(resp.status(), 200);
    }
    let seen = p.echo.seen.lock().expect("lock").clone();
    assert_eq!(seen.len(), 4);
    // The signature part alone is unique to the client token.
    let signatures: Vec<&str> = [&alice, &bob]
        .iter()
        .map(|t| t.rsplit('.').next().expect("sig"))
        .collect();
    for request in &seen {
        for (name, value) in &request.headers {
            let value = String::from_utf8_lossy(value.as_bytes());
            for (token, sig) in [&alice, &bob].iter().zip(&signatures) {
                assert!(
                    !value.contains(token.as_str()) && !value.contains(sig),
                    "client token in {name}"
                );
            }
        }
        assert!(request.headers.get("proxy-authorization").is_none());
    }
    // Each user's requests carry that user's exchanged token, from the cache the second time.
    let issued_for = |subject: &str| {
        p.idp
            .seen()
            .into_iter()
            .find(|r| r.param("subject_token") == Some(subject))
            .and_then(|r| r.issued)
            .expect("issued")
    };
    let (xa, xb) = (issued_for(&alice), issued_for(&bob));
    assert_ne!(xa, xb);
    let auth: Vec<String> = seen
        .iter()
        .map(|r| {
            r.headers["authorization"]
                .to_str()
                .expect("ascii")
                .to_owned()
        })
        .collect();
    assert_eq!(
        auth,
        [
            format!("Bearer {xa}"),
            format!("Bearer {xb}"),
            format!("Bearer {xa}"),
            format!("Bearer {xb}")
        ]
    );
    assert_eq!(p.idp.calls(), 2);
}

#[tokio::test]
async fn through_the_proxy_idp_failures_become_401_502_and_503() {
    let p = proxied(None, "").await;
    let cases = [
        (Answer::error(400, Some("invalid_grant")), 401, None),
        (Answer::error(401, Some("invalid_client")), 502, None),
        (Answer::Garbage, 502, None),
        (
            Answer::Error {
                status: 503,
                error: None,
                retry_after: Some("7".into()),
            },
            503,
            Some("7"),
        ),
    ];
    for (answer, status, retry_after) in cases {
        p.idp.answer(answer.clone());
        let resp = p.get(&p.token("alice")).await;
        assert_eq!(resp.status().as_u16(), status, "{answer:?}");
        if let Some(r) = retry_after {
            assert_eq!(resp.headers()["retry-after"], r, "{answer:?}");
        }
        if status == 401 {
            let challenge = resp.headers()["www-authenticate"]
                .to_str()
                .expect("ascii")
                .to_owned();
            assert!(challenge.contains("error=\"invalid_token\""), "{challenge}");
        }
        let body = resp.text().await.expect("body");
        assert!(
            !body.contains("s3cr3t") && !body.contains("maintenance"),
            "IdP text leaked: {body}"
        );
    }
    // Slower than exchange.timeout (1 s): 503 with a Retry-After, in about a second.
    p.idp.answer(Answer::issue(300));
    p.idp.delay(Duration::from_secs(3));
    let started = Instant::now();
    let resp = p.get(&p.token("alice")).await;
    assert_eq!(resp.status(), 503);
    assert!(resp.headers().contains_key("retry-after"));
    assert!(
        started.elapsed() < Duration::from_millis(2_500),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(
        p.echo.requests(),
        0,
        "nothing reaches the backend without an exchanged token"
    );
}

#[tokio::test]
async fn through_the_proxy_an_unreachable_idp_is_503_and_the_circuit_opens() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    drop(listener);
    let p = proxied(Some(format!("http://{addr}/token")), "").await;
    let resp = p.get(&p.token("alice")).await;
    assert_eq!(resp.status(), 503);
    assert_eq!(resp.headers()["retry-after"], "5");

    // The IdP answers 5xx: after the default threshold (5 consecutive failures, the one
    // above included) the circuit opens and requests fail at once with the cool-down left.
    for _ in 0..4 {
        assert_eq!(p.get(&p.token("alice")).await.status(), 503);
    }
    let admin = p.proxy.admin_addr;
    let calls = metric(admin, "txp_exchange_duration_seconds_count")
        .await
        .expect("count");
    assert_eq!(calls, 5.0);
    let resp = p.get(&p.token("bob")).await;
    assert_eq!(resp.status(), 503);
    let wait: u64 = resp.headers()["retry-after"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("seconds");
    assert!((1..=10).contains(&wait), "Retry-After {wait}");
    assert_eq!(
        metric(admin, "txp_exchange_duration_seconds_count").await,
        Some(5.0),
        "no call while open"
    );
    assert_eq!(
        metric(admin, "txp_exchange_requests_total{result=\"unavailable\"}").await,
        Some(6.0)
    );
}
