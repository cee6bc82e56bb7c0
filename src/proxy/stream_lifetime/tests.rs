//! [`StreamLifetimeLayer`] alone, with `oneshot`, a body fed by the test, and the tokio clock
//! paused.

use std::convert::Infallible;

use http_body_util::{BodyExt, StreamBody};
use tokio::sync::mpsc;
use tower::{ServiceBuilder, ServiceExt};

use super::*;

type Chunks = mpsc::Sender<Result<Frame<Bytes>, Infallible>>;

/// A backend answering `content_type` with a body the test writes through the sender.
fn backend(
    content_type: &'static str,
) -> (
    Chunks,
    impl Service<
        Request<()>,
        Response = Response<impl Body<Data = Bytes, Error = Infallible>>,
        Error = Infallible,
    > + Clone,
) {
    let (tx, rx) = mpsc::channel(16);
    let rx = std::sync::Arc::new(std::sync::Mutex::new(Some(rx)));
    let svc = tower::service_fn(move |_: Request<()>| {
        let rx = rx.lock().ok().and_then(|mut r| r.take());
        async move {
            let stream = futures_util::stream::unfold(rx, |rx| async move {
                let mut rx = rx?;
                let item = rx.recv().await?;
                Some((item, Some(rx)))
            });
            let mut resp = Response::new(StreamBody::new(Box::pin(stream)));
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                http::HeaderValue::from_static(content_type),
            );
            Ok::<_, Infallible>(resp)
        }
    });
    (tx, svc)
}

/// A request by `method` with a client token that expired `ago` seconds before now (negative:
/// that expires in that many seconds).
fn request(method: Method, expires_in: i64) -> Request<()> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let mut req = Request::builder()
        .method(method)
        .uri("/sse")
        .body(())
        .expect("request");
    req.extensions_mut().insert(Principal {
        sub: Some("alice".into()),
        expires_at: Some(now.saturating_add_signed(expires_in)),
        trusted_until: None,
        key_epoch: 0,
        profile: 0,
    });
    req
}

fn layer(metrics: &Arc<Metrics>, closing: &Trigger) -> StreamLifetimeLayer {
    StreamLifetimeLayer::new(
        true,
        Duration::from_secs(30),
        closing.clone(),
        metrics.clone(),
    )
}

async fn send(tx: &Chunks, s: &'static str) {
    tx.send(Ok(Frame::data(Bytes::from_static(s.as_bytes()))))
        .await
        .expect("body open");
}

/// The next data frame, or `None` at the end of the body.
async fn next<B>(body: &mut B) -> Option<String>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Debug,
{
    let frame = body.frame().await?.expect("frame");
    let data = frame.into_data().expect("data");
    Some(String::from_utf8(data.to_vec()).expect("utf8"))
}

#[test]
fn event_boundaries_are_blank_lines_with_any_line_ending() {
    let ends = |s: &str| {
        let mut scan = Scan::default();
        s.bytes().map(|b| scan.push(b)).collect::<Vec<_>>()
    };
    let at = |s: &str| {
        ends(s)
            .iter()
            .enumerate()
            .filter(|(_, e)| **e)
            .map(|(i, _)| i)
            .collect::<Vec<_>>()
    };
    assert_eq!(at("data: a\n\n"), vec![8]);
    assert_eq!(at("data: a\r\n\r\n"), vec![9]);
    assert_eq!(at("data: a\r\r"), vec![8]);
    assert_eq!(at("data: a\ndata: b\n\ndata: c\n"), vec![16]);
    assert_eq!(at(": keep-alive\n\n"), vec![13]);
    assert_eq!(at("data: a\n"), Vec::<usize>::new());
}

#[tokio::test(start_paused = true)]
async fn a_stream_ends_after_a_whole_event_once_its_token_expires() {
    let metrics = Arc::new(Metrics::default());
    let closing = Trigger::default();
    let (tx, svc) = backend("text/event-stream");
    // The token expires in 60 s; with the leeway the stream may run 90 s.
    let resp = ServiceBuilder::new()
        .layer(layer(&metrics, &closing))
        .service(svc)
        .oneshot(request(Method::GET, 60))
        .await
        .expect("infallible");
    let mut body = resp.into_body();
    send(&tx, "data: 1\n\n").await;
    assert_eq!(next(&mut body).await.as_deref(), Some("data: 1\n\n"));
    tokio::time::advance(Duration::from_secs(89)).await;
    send(&tx, "data: 2\n").await;
    assert_eq!(next(&mut body).await.as_deref(), Some("data: 2\n"));
    // Past exp + leeway, mid-event: the event is finished, then the stream ends; what the
    // backend wrote after it is not sent.
    tokio::time::advance(Duration::from_secs(2)).await;
    send(&tx, "data: more\n\ndata: 3\n\n").await;
    assert_eq!(next(&mut body).await.as_deref(), Some("data: more\n\n"));
    assert_eq!(next(&mut body).await, None);
    assert_eq!(metrics.streams_ended.get(StreamEnd::TokenExpired), 1);
}

#[tokio::test(start_paused = true)]
async fn a_stream_at_an_event_boundary_ends_as_soon_as_its_token_expires() {
    let metrics = Arc::new(Metrics::default());
    let closing = Trigger::default();
    let (tx, svc) = backend("text/event-stream; charset=utf-8");
    let resp = ServiceBuilder::new()
        .layer(layer(&metrics, &closing))
        .service(svc)
        .oneshot(request(Method::GET, 10))
        .await
        .expect("infallible");
    let mut body = resp.into_body();
    send(&tx, "id: 1\ndata: x\r\n\r\n").await;
    assert!(next(&mut body).await.is_some());
    let waited = tokio::time::Instant::now();
    // The backend says nothing more; the stream ends at exp + leeway (40 s) all the same.
    assert_eq!(next(&mut body).await, None);
    let at = waited.elapsed();
    assert!(
        at >= Duration::from_secs(39) && at <= Duration::from_secs(41),
        "{at:?}"
    );
    drop(tx);
}

#[tokio::test(start_paused = true)]
async fn a_backend_silent_mid_event_gets_five_seconds() {
    let metrics = Arc::new(Metrics::default());
    let closing = Trigger::default();
    let (tx, svc) = backend("text/event-stream");
    let resp = ServiceBuilder::new()
        .layer(layer(&metrics, &closing))
        .service(svc)
        .oneshot(request(Method::GET, 10))
        .await
        .expect("infallible");
    let mut body = resp.into_body();
    // Mid-event when the token's end (40 s away, with the leeway) comes: five more seconds
    // for the rest of the event, then the stream ends anyway.
    send(&tx, "data: partial").await;
    assert_eq!(next(&mut body).await.as_deref(), Some("data: partial"));
    let waited = tokio::time::Instant::now();
    assert_eq!(next(&mut body).await, None);
    let at = waited.elapsed();
    assert!(
        at >= Duration::from_secs(39) + MID_EVENT_GRACE
            && at <= Duration::from_secs(40) + MID_EVENT_GRACE,
        "{at:?}"
    );
    assert_eq!(metrics.streams_ended.get(StreamEnd::TokenExpired), 1);
    drop(tx);
}

#[tokio::test(start_paused = true)]
async fn post_responses_and_other_types_are_never_cut() {
    for (method, content_type) in [
        (Method::POST, "text/event-stream"),
        (Method::GET, "application/json"),
    ] {
        let metrics = Arc::new(Metrics::default());
        let closing = Trigger::default();
        let (tx, svc) = backend(content_type);
        let resp = ServiceBuilder::new()
            .layer(layer(&metrics, &closing))
            .service(svc)
            .oneshot(request(method.clone(), -100))
            .await
            .expect("infallible");
        let mut body = resp.into_body();
        tokio::time::advance(Duration::from_secs(600)).await;
        send(&tx, "data: a\n\n").await;
        send(&tx, "data: b\n\n").await;
        assert_eq!(next(&mut body).await.as_deref(), Some("data: a\n\n"));
        assert_eq!(next(&mut body).await.as_deref(), Some("data: b\n\n"));
        drop(tx);
        assert_eq!(next(&mut body).await, None, "{method} {content_type}");
        assert_eq!(metrics.streams_ended.get(StreamEnd::TokenExpired), 0);
    }
}

#[tokio::test(start_paused = true)]
async fn streams_end_at_their_next_event_when_the_listener_closes() {
    let metrics = Arc::new(Metrics::default());
    let closing = Trigger::default();
    let (tx, svc) = backend("text/event-stream");
    // Token-bound streams off: only the shutdown ends it.
    let resp = ServiceBuilder::new()
        .layer(StreamLifetimeLayer::new(
            false,
            Duration::from_secs(30),
            closing.clone(),
            metrics.clone(),
        ))
        .service(svc)
        .oneshot(request(Method::GET, -100))
        .await
        .expect("infallible");
    let mut body = resp.into_body();
    send(&tx, "data: 1\n").await;
    assert_eq!(next(&mut body).await.as_deref(), Some("data: 1\n"));
    closing.fire();
    send(&tx, "\ndata: 2\n\n").await;
    assert_eq!(next(&mut body).await.as_deref(), Some("\n"));
    assert_eq!(next(&mut body).await, None);
    assert_eq!(metrics.streams_ended.get(StreamEnd::Shutdown), 1);
    assert_eq!(metrics.streams_ended.get(StreamEnd::TokenExpired), 0);
}
