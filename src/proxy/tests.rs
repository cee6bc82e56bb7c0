//! The proxy's own layers alone, with `oneshot` and no network.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use tower::{ServiceBuilder, ServiceExt};

use super::*;
use crate::config::ProtectedResource;
use crate::error::Outcome;
use crate::exchange::CacheStatus;
use crate::inbound::{Principal, Public};
use crate::metadata::Resource;
use crate::metrics::Metrics;

/// A service answering `status` with `body`, and with `extensions` on the response (what the
/// inner layers would have left there).
fn answering(
    status: StatusCode,
    body: &'static str,
    extensions: http::Extensions,
) -> impl tower::Service<
    Request<()>,
    Response = Response<Full<Bytes>>,
    Error = std::convert::Infallible,
    Future: Send,
> + Clone {
    tower::service_fn(move |_: Request<()>| {
        let extensions = extensions.clone();
        async move {
            let mut resp = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
            *resp.status_mut() = status;
            *resp.extensions_mut() = extensions;
            Ok(resp)
        }
    })
}

fn principal(sub: &str) -> Principal {
    Principal {
        sub: Some(sub.into()),
        expires_at: None,
        trusted_until: None,
        key_epoch: 0,
        profile: 0,
    }
}

#[test]
fn the_access_line_takes_what_the_layers_decided() {
    let metrics = Arc::new(Metrics::default());
    let cases: Vec<(http::Extensions, &str, Option<&str>, Option<&str>)> = vec![
        (http::Extensions::new(), "forwarded", None, None),
        (
            {
                let mut e = http::Extensions::new();
                e.insert(Public);
                e
            },
            "public",
            None,
            None,
        ),
        (
            {
                let mut e = http::Extensions::new();
                e.insert(principal("alice"));
                e.insert(crate::exchange::Exchanged {
                    authorization: http::HeaderValue::from_static("Bearer x"),
                    cache: CacheStatus::Hit,
                    sub: None,
                });
                e
            },
            "forwarded",
            Some("alice"),
            Some("hit"),
        ),
        (
            {
                let mut e = http::Extensions::new();
                e.insert(Outcome("exchange_unavailable"));
                e.insert(principal("bob"));
                e
            },
            "exchange_unavailable",
            Some("bob"),
            None,
        ),
    ];
    for (extensions, outcome, sub, cache) in cases {
        let mut resp = Response::new(());
        *resp.extensions_mut() = extensions;
        let target = http::uri::PathAndQuery::from_static("/mcp?secret=1");
        let mut log = AccessLog::new(metrics.clone(), Method::GET, target);
        log.note(&resp);
        assert_eq!(log.outcome, outcome);
        assert_eq!(log.sub.as_deref(), sub);
        assert_eq!(log.cache, cache);
        assert_eq!(log.status, 200);
        assert_eq!(log.target.path(), "/mcp", "the query is never logged");
    }
}

#[tokio::test]
async fn a_request_is_counted_when_its_body_ends() {
    let metrics = Arc::new(Metrics::default());
    let svc = ServiceBuilder::new()
        .layer(AccessLogLayer::new(metrics.clone()))
        .service(answering(StatusCode::OK, "hello", http::Extensions::new()));
    let resp = svc.oneshot(Request::new(())).await.expect("infallible");
    assert_eq!(
        metrics.requests_with_status(200),
        0,
        "not before the body ends"
    );
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    assert_eq!(&body[..], b"hello");
    assert_eq!(metrics.requests_with_status(200), 1);
}

#[tokio::test]
async fn a_request_abandoned_before_its_response_is_still_counted() {
    let metrics = Arc::new(Metrics::default());
    let never = tower::service_fn(|_: Request<()>| async {
        std::future::pending::<()>().await;
        Ok::<Response<Full<Bytes>>, std::convert::Infallible>(Response::new(Full::default()))
    });
    let svc = ServiceBuilder::new()
        .layer(AccessLogLayer::new(metrics.clone()))
        .service(never);
    let call = svc.oneshot(Request::new(()));
    assert!(
        tokio::time::timeout(Duration::from_millis(20), call)
            .await
            .is_err()
    );
    assert_eq!(metrics.aborted_requests(), 1);
    assert_eq!(metrics.requests_with_status(100), 0);
}

#[tokio::test]
async fn the_metadata_document_is_answered_and_everything_else_passes() {
    let resource = Arc::new(Resource {
        public_url: Some("https://mcp.example.com".parse().expect("url")),
        config: ProtectedResource {
            resource: None,
            authorization_servers: vec!["https://idp.example.com".into()],
            scopes_supported: vec![],
        },
    });
    let svc = ServiceBuilder::new()
        .layer(ProtectedResourceLayer::new(resource))
        .service(answering(
            StatusCode::IM_A_TEAPOT,
            "",
            http::Extensions::new(),
        ));
    let get = Request::get("/.well-known/oauth-protected-resource/mcp")
        .body(())
        .expect("request");
    let resp = svc.clone().oneshot(get).await.expect("infallible");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.extensions().get::<Outcome>(), Some(&Outcome::METADATA));
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    let doc: serde_json::Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(doc["resource"], "https://mcp.example.com/mcp");
    let post = Request::post("/.well-known/oauth-protected-resource")
        .body(())
        .expect("request");
    let resp = svc.clone().oneshot(post).await.expect("infallible");
    assert_eq!(resp.status(), StatusCode::IM_A_TEAPOT);
    let other = Request::get("/.well-known/oauth-protected-resourcex")
        .body(())
        .expect("request");
    let resp = svc.oneshot(other).await.expect("infallible");
    assert_eq!(resp.status(), StatusCode::IM_A_TEAPOT);
}

#[tokio::test]
async fn a_silent_backend_body_ends_as_an_idle_timeout() {
    let metrics = Arc::new(Metrics::default());
    let silent = http_body_util::StreamBody::new(futures_util::stream::pending::<
        Result<http_body::Frame<Bytes>, std::convert::Infallible>,
    >());
    let bounded = tower_http::timeout::TimeoutBody::new(Duration::from_millis(20), silent);
    let log = AccessLog::new(
        metrics.clone(),
        Method::GET,
        http::uri::PathAndQuery::from_static("/sse"),
    );
    let body = LoggedBody::new(bounded, log);
    let err = body.collect().await.expect_err("timed out");
    assert!(access_log::is_idle_timeout(&*err), "{err}");
    assert_eq!(
        metrics
            .upstream_errors
            .get(crate::metrics::UpstreamErrorKind::Timeout),
        1
    );
    assert_eq!(metrics.aborted_requests(), 1, "logged once, at its end");
}
