//! [`BearerAuthLayer`] alone, with `oneshot` and no network: keys are installed in memory.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use http::{HeaderMap, Request, Response, StatusCode};
use tower::{ServiceBuilder, ServiceExt};

use super::*;
use crate::config::ProtectedResource;
use crate::inbound::tests::{claims, inbound, mint, rs256, validator, validator_with};
use crate::metadata::Resource;
use crate::metrics::{Metrics, RejectReason};

/// What the inner service saw of the one request that reached it.
#[derive(Default)]
struct Seen {
    calls: AtomicUsize,
    headers: Mutex<Option<HeaderMap>>,
    principal: Mutex<Option<Principal>>,
    public: Mutex<Option<Public>>,
    recalled: Mutex<Option<&'static str>>,
}

fn responder(metrics: Arc<Metrics>) -> Responder {
    let resource = Resource {
        public_url: Some("https://mcp.example.com".parse().expect("url")),
        config: ProtectedResource {
            resource: None,
            authorization_servers: vec![],
            scopes_supported: vec![],
        },
    };
    Responder::new(Arc::new(resource), metrics)
}

/// Runs one request through `layer` in front of a service that records what it saw.
async fn run<R: Recall<Recalled = &'static str>>(
    layer: BearerAuthLayer<R>,
    req: Request<()>,
) -> (Response<ResponseBody<()>>, Arc<Seen>) {
    let seen = Arc::new(Seen::default());
    let s = seen.clone();
    let svc = ServiceBuilder::new()
        .layer(layer)
        .service(tower::service_fn(move |req: Request<()>| {
            let s = s.clone();
            async move {
                s.calls.fetch_add(1, Ordering::SeqCst);
                *s.headers.lock().expect("lock") = Some(req.headers().clone());
                *s.principal.lock().expect("lock") = req.extensions().get::<Principal>().cloned();
                *s.public.lock().expect("lock") = req.extensions().get::<Public>().copied();
                *s.recalled.lock().expect("lock") = req.extensions().get::<&'static str>().copied();
                Ok::<_, std::convert::Infallible>(Response::new(()))
            }
        }));
    let resp = svc.oneshot(req).await.expect("infallible");
    (resp, seen)
}

fn request(path: &str, authorization: Option<&str>) -> Request<()> {
    let mut b = Request::builder().uri(path);
    if let Some(a) = authorization {
        b = b.header(header::AUTHORIZATION, a);
    }
    b.body(()).expect("request")
}

fn layer(v: Validator, public: &[&str], metrics: Arc<Metrics>) -> BearerAuthLayer {
    let mut config = inbound(&[]);
    config.public_paths = public.iter().map(|p| p.to_string()).collect();
    BearerAuthLayer::new(Arc::new(v), &config, responder(metrics))
}

/// Never recalls anything, but counts the calls; `&'static str` stands for what a recall
/// brings along.
#[derive(Clone, Default)]
struct Remembers(Option<&'static str>, Arc<AtomicUsize>);

impl Recall for Remembers {
    type Recalled = &'static str;

    async fn recall(
        &self,
        _: &str,
        _: &crate::inbound::cache::TokenDigest,
        _: u64,
    ) -> Option<(Principal, &'static str)> {
        self.1.fetch_add(1, Ordering::SeqCst);
        self.0.map(|found| {
            let principal = Principal {
                sub: Some("remembered".into()),
                expires_at: None,
                trusted_until: None,
                key_epoch: 0,
                profile: 0,
            };
            (principal, found)
        })
    }
}

#[tokio::test]
async fn a_valid_token_reaches_the_inner_service_with_its_principal() {
    let metrics = Arc::new(Metrics::default());
    let token = mint(&rs256(), &claims());
    let layer = layer(validator(), &[], metrics).recall(Remembers::default());
    let (resp, seen) = run(layer, request("/mcp", Some(&format!("bEaReR  {token} ")))).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(seen.calls.load(Ordering::SeqCst), 1);
    let principal = seen
        .principal
        .lock()
        .expect("lock")
        .clone()
        .expect("principal");
    assert_eq!(principal.sub.as_deref(), Some("alice"));
    // The header the inner service sees is the canonical form of the validated token.
    let headers = seen.headers.lock().expect("lock").clone().expect("headers");
    assert_eq!(
        headers[header::AUTHORIZATION],
        format!("Bearer {token}").as_str()
    );
    assert!(seen.public.lock().expect("lock").is_none());
}

#[tokio::test]
async fn without_a_token_the_challenge_is_answered_and_nothing_passes() {
    let metrics = Arc::new(Metrics::default());
    let (resp, seen) = run(
        layer(validator(), &[], metrics.clone()).recall(Remembers::default()),
        request("/mcp", None),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        resp.headers()[header::WWW_AUTHENTICATE],
        "Bearer resource_metadata=\"https://mcp.example.com/.well-known/oauth-protected-resource/mcp\""
    );
    assert_eq!(seen.calls.load(Ordering::SeqCst), 0);
    assert_eq!(metrics.token_rejections.get(RejectReason::Missing), 1);
}

#[tokio::test]
async fn an_invalid_token_is_refused_with_its_reason() {
    let metrics = Arc::new(Metrics::default());
    let mut expired = claims();
    expired["exp"] = serde_json::json!(crate::inbound::tests::now() - 3600);
    for (token, description) in [
        (mint(&rs256(), &expired), "token expired"),
        ("not-a-jwt".to_string(), "token is not a JWT"),
    ] {
        let (resp, seen) = run(
            layer(validator(), &[], metrics.clone()).recall(Remembers::default()),
            request("/mcp", Some(&format!("Bearer {token}"))),
        )
        .await;
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "{description}");
        let challenge = resp.headers()[header::WWW_AUTHENTICATE]
            .to_str()
            .expect("ascii");
        assert!(
            challenge.contains(&format!("error_description=\"{description}\"")),
            "{challenge}"
        );
        assert!(
            !challenge.contains(&token),
            "the challenge echoes the token"
        );
        assert_eq!(seen.calls.load(Ordering::SeqCst), 0);
    }
}

#[tokio::test]
async fn a_public_path_passes_without_any_credential() {
    let metrics = Arc::new(Metrics::default());
    let token = mint(&rs256(), &claims());
    let mut req = request("/health/live", Some(&format!("Bearer {token}")));
    req.headers_mut().insert(
        header::PROXY_AUTHORIZATION,
        HeaderValue::from_static("Basic eDp5"),
    );
    let (resp, seen) = run(
        layer(validator(), &["/health"], metrics).recall(Remembers::default()),
        req,
    )
    .await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(*seen.public.lock().expect("lock"), Some(Public));
    assert!(seen.principal.lock().expect("lock").is_none());
    let headers = seen.headers.lock().expect("lock").clone().expect("headers");
    assert!(headers.get(header::AUTHORIZATION).is_none());
    assert!(headers.get(header::PROXY_AUTHORIZATION).is_none());
}

#[tokio::test]
async fn a_path_that_only_looks_public_needs_a_token() {
    let metrics = Arc::new(Metrics::default());
    let (resp, seen) = run(
        layer(validator(), &["/health"], metrics).recall(Remembers::default()),
        request("/health/..;/mcp", None),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(seen.calls.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_recalled_acceptance_is_used_without_the_validator() {
    // A validator without keys accepts nothing: the request passes on the recall alone.
    let metrics = Arc::new(Metrics::default());
    let no_keys = validator_with(&inbound(&[]), None);
    let calls = Arc::new(AtomicUsize::new(0));
    let layer = layer(no_keys, &[], metrics).recall(Remembers(Some("found"), calls.clone()));
    let (resp, seen) = run(layer, request("/mcp", Some("Bearer seen.before.token"))).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(*seen.recalled.lock().expect("lock"), Some("found"));
    let principal = seen
        .principal
        .lock()
        .expect("lock")
        .clone()
        .expect("principal");
    assert_eq!(principal.sub.as_deref(), Some("remembered"));
}

#[tokio::test]
async fn nothing_recalled_means_the_token_is_validated() {
    let metrics = Arc::new(Metrics::default());
    let no_keys = validator_with(&inbound(&[]), None);
    let calls = Arc::new(AtomicUsize::new(0));
    let layer = layer(no_keys, &[], metrics).recall(Remembers(None, calls.clone()));
    let token = mint(&rs256(), &claims());
    let (resp, seen) = run(layer, request("/mcp", Some(&format!("Bearer {token}")))).await;
    // No keys loaded yet: validation is unavailable, and nothing passes.
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(seen.calls.load(Ordering::SeqCst), 0);
}

#[test]
fn bearer_scheme_is_case_insensitive() {
    let auth = |v: &str| {
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(v).expect("value"),
        );
        h
    };
    assert_eq!(
        bearer_token(&auth("Bearer abc.def.ghi"), 100),
        Ok("abc.def.ghi")
    );
    assert_eq!(bearer_token(&auth("bEaReR abc"), 100), Ok("abc"));
    assert_eq!(
        bearer_token(&HeaderMap::new(), 100),
        Err(Denial::MissingToken)
    );
    let long = format!("Bearer {}", "a".repeat(101));
    for (value, expected) in [
        ("Basic dXNlcg==", Denial::MissingToken),
        ("Bearer", Denial::MalformedToken),
        ("Bearer ", Denial::MalformedToken),
        (long.as_str(), Denial::TokenTooLarge),
    ] {
        assert_eq!(bearer_token(&auth(value), 100), Err(expected), "{value}");
    }
    // The alphabet is the validator's to check (before any cache): these get that far.
    assert_eq!(bearer_token(&auth("Bearer a b"), 100), Ok("a b"));
    let mut two = auth("Bearer a");
    two.append(header::AUTHORIZATION, HeaderValue::from_static("Bearer b"));
    assert_eq!(bearer_token(&two, 100), Err(Denial::MalformedToken));
}

#[test]
fn public_paths_match_whole_segments_only() {
    let p = vec!["/health".to_string(), "/static/".to_string()];
    assert!(is_public_path(&p, "/health"));
    assert!(is_public_path(&p, "/health/live"));
    assert!(!is_public_path(&p, "/healthz-admin"));
    assert!(is_public_path(&p, "/static/app.js"));
    assert!(!is_public_path(&p, "/health/../mcp"));
    assert!(!is_public_path(&[], "/health"));
    for parameter in ["/health/..;/mcp", "/health;/mcp", "/health/.;/mcp"] {
        assert!(!is_public_path(&p, parameter), "{parameter}");
    }
}

#[test]
fn plain_paths_exclude_traversal_tricks() {
    assert!(is_plain_path("/health/live"));
    assert!(is_plain_path("/health/v1.2/x.json"));
    for tricky in [
        "/health/../admin",
        "/health/./admin",
        "/health/.../admin",
        "/health/%2e%2e/admin",
        "/health%2Fadmin",
        "/health\\admin",
        "/health/..;/mcp",
        "/health/..;jsessionid=1/mcp",
        "/health;x=1/../mcp",
        "/health/.;/mcp",
        "/health/%3b/mcp",
        "/health/%252e%252e/mcp",
        "/health/%00/mcp",
    ] {
        assert!(!is_plain_path(tricky), "{tricky}");
    }
}

/// Two gates: the first never finds anything, the second finds every token; each counts
/// the lookups it is asked for.
fn two_gates(first: &Arc<AtomicUsize>, second: &Arc<AtomicUsize>) -> BearerAuthLayer<Remembers> {
    let config = inbound(&[]);
    let gate = |recall| Gate {
        validator: Arc::new(validator_with(&config, None)),
        recall,
    };
    BearerAuthLayer::with_gates(
        vec![
            gate(Remembers(None, first.clone())),
            gate(Remembers(Some("second"), second.clone())),
        ],
        vec![],
        config.max_token_bytes,
        responder(Arc::new(Metrics::default())),
    )
}

#[tokio::test]
async fn a_token_found_in_a_later_gate_is_looked_up_there_first_next_time() {
    let (first, second) = (Arc::default(), Arc::default());
    let layer = two_gates(&first, &second);
    let req = || request("/mcp", Some("Bearer seen.before.token"));
    let (resp, seen) = run(layer.clone(), req()).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(*seen.recalled.lock().expect("lock"), Some("second"));
    assert_eq!(first.load(Ordering::SeqCst), 1);
    assert_eq!(second.load(Ordering::SeqCst), 1);
    // Again: straight to the second gate.
    let (resp, seen) = run(layer, req()).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(*seen.recalled.lock().expect("lock"), Some("second"));
    assert_eq!(
        first.load(Ordering::SeqCst),
        1,
        "the first gate is not asked again"
    );
    assert_eq!(second.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_hint_pointing_elsewhere_only_orders_the_lookups() {
    // A slot shared with a token of the first gate (or any stale note) points at it: the
    // second gate is still asked, and the token is found there.
    let (first, second) = (Arc::default(), Arc::default());
    let layer = two_gates(&first, &second);
    let token = "seen.before.token";
    layer.shared.hints.set(&cache::digest(token), 0);
    let (resp, seen) = run(
        layer.clone(),
        request("/mcp", Some(&format!("Bearer {token}"))),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(*seen.recalled.lock().expect("lock"), Some("second"));
    assert_eq!(first.load(Ordering::SeqCst), 1);
    assert_eq!(second.load(Ordering::SeqCst), 1);
    assert_eq!(layer.shared.hints.get(&cache::digest(token)), Some(1));
}

#[test]
fn one_gate_keeps_no_table() {
    assert_eq!(Hints::for_gates(1).0.len(), 0);
    assert_eq!(Hints::for_gates(2).0.len(), Hints::SLOTS);
    let one = Hints::for_gates(1);
    let digest = cache::digest("t");
    one.set(&digest, 0);
    assert_eq!(one.get(&digest), None);
}
