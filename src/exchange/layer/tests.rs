//! [`TokenExchangeLayer`] alone and behind [`crate::inbound::BearerAuthLayer`], with `oneshot`
//! and no network: cache entries are put in place directly, and the token endpoint is never
//! known, so an exchange that would need the IdP answers 503.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use http::{HeaderMap, Request, StatusCode};
use tower::{ServiceBuilder, ServiceExt};

use super::*;
use crate::config::{ACCESS_TOKEN_TYPE, Cache, ClientAuth, Exchange, IdpTls, ProtectedResource};
use crate::exchange::cache::CachedToken;
use crate::idp::IdpClient;
use crate::inbound::{BearerAuthLayer, Public};
use crate::metadata::Resource;
use crate::metrics::Metrics;
use crate::readiness::Readiness;

const CLIENT_TOKEN: &str = "client.token.seen-before";
const BACKEND_TOKEN: &str = "Bearer backend-token";

struct Setup {
    exchanger: Arc<Exchanger>,
    validator: Arc<Validator>,
    responder: Responder,
    inbound: crate::config::Inbound,
}

fn setup() -> Setup {
    let idp = IdpClient::new(&IdpTls {
        ca_file: None,
        allow_plain_http: false,
    })
    .expect("client");
    let metrics = Arc::new(Metrics::default());
    let readiness = Arc::new(Readiness::default());
    let exchange = Exchange {
        grant: crate::config::Grant::TokenExchange,
        // No endpoint and no discovery: the IdP is never called.
        token_endpoint: None,
        issuer: "http://127.0.0.1:1".into(),
        client_id: "txp".into(),
        client_auth: ClientAuth::None,
        audience: vec!["backend".into()],
        resource: vec![],
        scope: None,
        subject_token_type: ACCESS_TOKEN_TYPE.into(),
        requested_token_type: ACCESS_TOKEN_TYPE.into(),
        extra_params: BTreeMap::new(),
        timeout: Duration::from_secs(1),
        max_concurrent: 64,
        negative_ttl: Duration::from_secs(10),
        verify_issued: crate::config::VerifyIssued::Auto,
    };
    let cache = Cache {
        max_entries: 10,
        max_ttl: Duration::from_secs(300),
        expiry_margin: Duration::from_secs(15),
        refresh_ahead: Duration::from_secs(30),
        stale_if_error: true,
    };
    let exchanger = Arc::new(
        Exchanger::new(
            &exchange,
            &cache,
            idp.clone(),
            metrics.clone(),
            readiness.clone(),
        )
        .expect("exchanger"),
    );
    let inbound = crate::config::Inbound {
        issuer: "http://127.0.0.1:1".into(),
        discovery_url: None,
        jwks_uri: None,
        audiences: vec!["mcp".into()],
        algorithms: vec![jsonwebtoken::Algorithm::ES256],
        leeway: Duration::from_secs(30),
        required_scopes: vec![],
        max_token_bytes: 8192,
        introspection: None,
        public_paths: vec!["/health".into()],
        stream_lifetime: crate::config::StreamLifetime::Token,
    };
    // Never started and without keys: it accepts nothing by itself.
    let validator = Arc::new(Validator::new(&inbound, idp, metrics.clone(), readiness));
    let resource = Resource {
        public_url: None,
        config: ProtectedResource {
            resource: None,
            authorization_servers: vec![],
            scopes_supported: vec![],
        },
    };
    Setup {
        exchanger,
        validator,
        responder: Responder::new(Arc::new(resource), metrics),
        inbound,
    }
}

fn principal() -> Principal {
    Principal {
        sub: Some("alice".into()),
        expires_at: None,
        trusted_until: Some(tokio::time::Instant::now() + Duration::from_secs(60)),
        key_epoch: 0,
        profile: 0,
    }
}

impl Setup {
    fn layer(&self) -> TokenExchangeLayer {
        TokenExchangeLayer::new(
            self.exchanger.clone(),
            self.validator.clone(),
            self.responder.clone(),
            self.inbound.max_token_bytes,
        )
    }

    /// Caches `BACKEND_TOKEN` for `CLIENT_TOKEN`, resting on `principal()`.
    async fn remember_exchange(&self) {
        let entry = CachedToken::new(
            HeaderValue::from_static(BACKEND_TOKEN),
            Duration::from_secs(60),
            Duration::from_secs(75),
            tokio::time::Instant::now(),
        )
        .resting_on(&principal());
        self.exchanger
            .cache
            .insert(self.exchanger.key(CLIENT_TOKEN), entry)
            .await;
    }
}

/// What the inner service saw.
#[derive(Default)]
struct Seen {
    calls: AtomicUsize,
    headers: Mutex<Option<HeaderMap>>,
    cache: Mutex<Option<CacheStatus>>,
}

fn recorder(
    seen: Arc<Seen>,
) -> impl tower::Service<
    Request<()>,
    Response = http::Response<()>,
    Error = std::convert::Infallible,
    Future: Send,
> + Clone
+ Send
+ 'static {
    tower::service_fn(move |req: Request<()>| {
        let seen = seen.clone();
        async move {
            seen.calls.fetch_add(1, Ordering::SeqCst);
            *seen.headers.lock().expect("lock") = Some(req.headers().clone());
            *seen.cache.lock().expect("lock") =
                req.extensions().get::<Exchanged>().map(|e| e.cache);
            Ok(http::Response::new(()))
        }
    })
}

fn request(path: &str) -> Request<()> {
    Request::builder()
        .uri(path)
        .header(header::AUTHORIZATION, format!("Bearer {CLIENT_TOKEN}"))
        .body(())
        .expect("request")
}

#[tokio::test]
async fn a_token_seen_before_is_accepted_and_swapped_in_one_lookup() {
    let s = setup();
    s.remember_exchange().await;
    let seen = Arc::new(Seen::default());
    let svc = ServiceBuilder::new()
        .layer(
            BearerAuthLayer::new(s.validator.clone(), &s.inbound, s.responder.clone())
                .recall(s.exchanger.clone()),
        )
        .layer(s.layer())
        .service(recorder(seen.clone()));
    let resp = svc.oneshot(request("/mcp")).await.expect("infallible");
    assert_eq!(resp.status(), StatusCode::OK);
    let headers = seen.headers.lock().expect("lock").clone().expect("seen");
    assert_eq!(headers[header::AUTHORIZATION], BACKEND_TOKEN);
    assert!(headers[header::AUTHORIZATION].is_sensitive());
    assert_eq!(*seen.cache.lock().expect("lock"), Some(CacheStatus::Hit));
}

#[tokio::test]
async fn an_acceptance_from_an_older_key_epoch_is_not_recalled() {
    let s = setup();
    s.remember_exchange().await;
    let key_epoch_now = 1;
    let digest = crate::inbound::cache::digest;
    let client = digest(CLIENT_TOKEN);
    assert!(
        s.exchanger
            .recall(CLIENT_TOKEN, &client, key_epoch_now)
            .await
            .is_none()
    );
    assert!(s.exchanger.recall(CLIENT_TOKEN, &client, 0).await.is_some());
    let another = "another.token.x";
    assert!(
        s.exchanger
            .recall(another, &digest(another), 0)
            .await
            .is_none()
    );
}

#[tokio::test]
async fn a_request_without_a_principal_goes_on_without_any_token() {
    let s = setup();
    s.remember_exchange().await;
    let seen = Arc::new(Seen::default());
    // No principal: as if the layers above let it through (a public path), or were left out.
    let mut req = request("/health");
    req.extensions_mut().insert(Public);
    let resp = ServiceBuilder::new()
        .layer(s.layer())
        .service(recorder(seen.clone()))
        .oneshot(req)
        .await
        .expect("infallible");
    assert_eq!(resp.status(), StatusCode::OK);
    let headers = seen.headers.lock().expect("lock").clone().expect("seen");
    assert!(headers.get(header::AUTHORIZATION).is_none());
    assert!(seen.cache.lock().expect("lock").is_none());
}

#[tokio::test]
async fn a_failed_exchange_is_answered_and_nothing_passes() {
    let s = setup();
    let seen = Arc::new(Seen::default());
    let mut req = request("/mcp");
    req.extensions_mut().insert(principal());
    let resp = ServiceBuilder::new()
        .layer(s.layer())
        .service(recorder(seen.clone()))
        .oneshot(req)
        .await
        .expect("infallible");
    // The token endpoint is not known: the IdP is unavailable.
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(resp.headers().contains_key(header::RETRY_AFTER));
    assert_eq!(seen.calls.load(Ordering::SeqCst), 0);
    // The access log learns whose token it was.
    let logged = resp.extensions().get::<Principal>().expect("principal");
    assert_eq!(logged.sub.as_deref(), Some("alice"));
}

#[tokio::test]
async fn the_entry_found_by_the_recall_is_the_one_sent() {
    let s = setup();
    let seen = Arc::new(Seen::default());
    let mut req = request("/mcp");
    req.extensions_mut().insert(principal());
    req.extensions_mut().insert(Exchanged {
        authorization: HeaderValue::from_static("Bearer recalled"),
        cache: CacheStatus::Hit,
        sub: None,
    });
    let resp = ServiceBuilder::new()
        .layer(s.layer())
        .service(recorder(seen.clone()))
        .oneshot(req)
        .await
        .expect("infallible");
    assert_eq!(resp.status(), StatusCode::OK);
    let headers = seen.headers.lock().expect("lock").clone().expect("seen");
    assert_eq!(headers[header::AUTHORIZATION], "Bearer recalled");
    assert_eq!(headers.get_all(header::AUTHORIZATION).iter().count(), 1);
}
