//! The admin listener: `/healthz`, `/readyz`, `/metrics`, and `POST /cache/purge`. Never
//! needs a token and never forwards anything; bind it where only the kubelet, the metrics
//! scraper and the operators reach it (README "Admin endpoints").
//!
//! Probes and scrapers speak HTTP/1.1, so that is all it speaks (a connection opening with
//! the HTTP/2 preface is closed unanswered), and it gives a client little to hold: each request
//! head, the first or the next on a kept-alive connection, must arrive within
//! [`HEADER_READ_TIMEOUT`] and fit in [`MAX_HEADER_BYTES`].

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

use crate::metrics::Metrics;
use crate::readiness::Readiness;

/// A probe or scraper sends its whole request head at once; a client still sending one after
/// this long is holding a connection open, and is disconnected.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest request head (request line and headers) accepted; a probe's is well under 1 KiB.
/// A larger one is answered 431 and the connection closed.
pub const MAX_HEADER_BYTES: usize = 16 * 1024;

/// Largest `POST /cache/purge` body: `{"sub": …}` with a long subject fits many times over.
pub const MAX_PURGE_BODY: usize = 4096;

/// Refreshes gauges that are read from elsewhere (the cache size) before `/metrics` renders.
pub type BeforeRender = Arc<dyn Fn() -> futures_util::future::BoxFuture<'static, ()> + Send + Sync>;

/// Forgets the cached entries of one `sub` (`None`: all); yields how many went.
pub type Purge =
    Arc<dyn Fn(Option<String>) -> futures_util::future::BoxFuture<'static, u64> + Send + Sync>;

/// What the admin endpoints read.
#[derive(Clone)]
pub struct AdminState {
    pub metrics: Arc<Metrics>,
    pub readiness: Arc<Readiness>,
    pub before_render: Option<BeforeRender>,
    pub purge: Option<Purge>,
}

/// The body of `POST /cache/purge`: exactly one of the two forms.
#[derive(Debug, serde::Deserialize)]
#[serde(untagged, deny_unknown_fields)]
enum PurgeRequest {
    /// `{"sub": "<sub>"}`: every entry of that client.
    Sub { sub: String },
    /// `{"all": true}`: everything.
    All { all: bool },
}

/// Serves the admin endpoints on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, state: AdminState) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                tracing::warn!(error = %e, "admin accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let state = state.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(handle(&state, req).await) }
            });
            let _ = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .max_header_size(MAX_HEADER_BYTES)
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

async fn handle(state: &AdminState, req: Request<Incoming>) -> Response<Full<Bytes>> {
    if req.uri().path() == "/cache/purge" {
        return purge(state, req).await;
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
    }
    match req.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" => match state.readiness.check() {
            Ok(()) => text(StatusCode::OK, "ready\n"),
            Err(why) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!("not ready: {why}\n"),
            ),
        },
        "/metrics" => {
            if let Some(f) = &state.before_render {
                f().await;
            }
            let tasks = tokio::runtime::Handle::current()
                .metrics()
                .num_alive_tasks();
            state.metrics.runtime_tasks.store(
                u64::try_from(tasks).unwrap_or(u64::MAX),
                std::sync::atomic::Ordering::Relaxed,
            );
            let mut resp = Response::new(Full::new(Bytes::from(state.metrics.render())));
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            resp
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// `POST /cache/purge`: `{"sub": "<sub>"}` or `{"all": true}`; answers `{"purged": N}`.
async fn purge(state: &AdminState, req: Request<Incoming>) -> Response<Full<Bytes>> {
    use http_body_util::BodyExt as _;
    if req.method() != Method::POST {
        return text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
    }
    let Some(run) = &state.purge else {
        return text(StatusCode::NOT_FOUND, "not found\n");
    };
    let body = http_body_util::Limited::new(req.into_body(), MAX_PURGE_BODY)
        .collect()
        .await
        .map(|b| b.to_bytes());
    let request = body
        .ok()
        .and_then(|b| serde_json::from_slice::<PurgeRequest>(&b).ok());
    let sub = match request {
        Some(PurgeRequest::Sub { sub }) if !sub.is_empty() => Some(sub),
        Some(PurgeRequest::All { all: true }) => None,
        _ => {
            return json(
                StatusCode::BAD_REQUEST,
                &serde_json::json!({
                    "error": "invalid_request",
                    "error_description": "expected {\"sub\": \"<sub>\"} or {\"all\": true}",
                }),
            );
        }
    };
    let purged = run(sub).await;
    json(StatusCode::OK, &serde_json::json!({ "purged": purged }))
}

fn json(status: StatusCode, body: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    resp
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::copy_from_slice(body.as_bytes())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::time::{Duration, Instant};

    use hyper_util::rt::TokioExecutor;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    use super::*;

    /// Serves the admin endpoints on a loopback port for the rest of the test.
    async fn admin() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(serve(
            listener,
            AdminState {
                metrics: Arc::default(),
                readiness: Arc::default(),
                before_render: None,
                purge: None,
            },
        ));
        addr
    }

    /// Writes `request` and reads until the server closes (at most 8 s): what came back, and
    /// whether the server closed the connection.
    async fn exchange_raw(addr: SocketAddr, request: &[u8]) -> (String, bool) {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(request).await.expect("write");
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        let deadline = tokio::time::Instant::now() + Duration::from_secs(8);
        let closed = loop {
            match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
                Err(_) => break false,
                Ok(Ok(0) | Err(_)) => break true,
                Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            }
        };
        (String::from_utf8_lossy(&got).into_owned(), closed)
    }

    #[tokio::test]
    async fn http2_prior_knowledge_is_refused() {
        let addr = admin().await;
        let io = TokioIo::new(TcpStream::connect(addr).await.expect("connect"));
        let outcome = tokio::time::timeout(Duration::from_secs(8), async {
            let (mut send, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await?;
            tokio::spawn(conn);
            let req = Request::get(format!("http://{addr}/healthz"))
                .body(http_body_util::Empty::<Bytes>::new())
                .expect("request");
            send.send_request(req).await.map(|r| r.status())
        })
        .await
        .expect("answered or refused within 8 s");
        assert!(outcome.is_err(), "HTTP/2 was served: {outcome:?}");
        // HTTP/1.1 on the same listener works.
        let (text, _) = exchange_raw(
            addr,
            b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    }

    #[tokio::test]
    async fn a_client_stalling_inside_its_headers_is_disconnected() {
        let addr = admin().await;
        let started = Instant::now();
        let (text, closed) = exchange_raw(addr, b"GET /healthz HTTP/1.1\r\nHost: x\r\n").await;
        assert!(closed, "connection still open after 8 s: {text:?}");
        assert!(
            started.elapsed() >= Duration::from_secs(4),
            "closed after {:?}, before the header timeout",
            started.elapsed()
        );
    }

    #[tokio::test]
    async fn headers_over_16_kib_are_refused_and_small_ones_served() {
        let addr = admin().await;
        let big = format!(
            "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\nConnection: close\r\n\r\n",
            "a".repeat(20 * 1024)
        );
        let (text, closed) = exchange_raw(addr, big.as_bytes()).await;
        assert!(text.starts_with("HTTP/1.1 431"), "{text:?}");
        assert!(closed);
        let small = format!(
            "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Small: {}\r\nConnection: close\r\n\r\n",
            "a".repeat(8 * 1024)
        );
        let (text, _) = exchange_raw(addr, small.as_bytes()).await;
        assert!(text.starts_with("HTTP/1.1 200"), "{text:?}");
    }
}
