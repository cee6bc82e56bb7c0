//! The backend of `benches/run.sh` and `benches/soak.sh`: an HTTP/1.1 server that answers
//! every request with the same small body and does nothing else (the request body, if any, is
//! drained), except:
//!
//! - `GET /sse?n=N&gap_ms=G`: an event stream (`text/event-stream`) of `N` events, one every
//!   `G` ms (`id: i`, `data: i`, i from 0), then the end of the body; `n=0`: until the client
//!   goes away;
//! - `GET /stats`: streams open, started and finished, and events written, as JSON.
//!
//! Prints its address on the first line of stdout once it accepts connections. Runs on one
//! thread: it shares a core with the load generator.
//!
//! ```text
//! cargo run --release --example bench_backend -- --listen 127.0.0.1:0
//! ```

use std::convert::Infallible;
use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use http::{Method, Response, header};
use http_body::Frame;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// The fixed response body: about the size of a small JSON-RPC answer.
const BODY: &[u8] = br#"{"jsonrpc":"2.0","id":1,"result":{"ok":true,"server":"bench"}}"#;

/// Backend for the benchmarks.
#[derive(Debug, Parser)]
struct Args {
    /// Address to listen on (port 0: any free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
}

/// The response body: fixed, or an event stream.
type Body = UnsyncBoxBody<Bytes, Infallible>;

/// Longest gap between two events of `/sse`.
const MAX_GAP_MS: u64 = 60_000;

/// Counters of `/sse`, reported by `/stats`.
static STREAMS_OPEN: AtomicU64 = AtomicU64::new(0);
static STREAMS_STARTED: AtomicU64 = AtomicU64::new(0);
static STREAMS_FINISHED: AtomicU64 = AtomicU64::new(0);
static EVENTS: AtomicU64 = AtomicU64::new(0);

async fn answer(req: http::Request<Incoming>) -> Result<Response<Body>, Infallible> {
    if req.method() == Method::GET {
        match req.uri().path() {
            "/sse" => return Ok(sse(req.uri().query().unwrap_or(""))),
            "/stats" => {
                let stats = format!(
                    r#"{{"streams_open":{},"streams_started":{},"streams_finished":{},"events":{}}}"#,
                    STREAMS_OPEN.load(Ordering::Relaxed),
                    STREAMS_STARTED.load(Ordering::Relaxed),
                    STREAMS_FINISHED.load(Ordering::Relaxed),
                    EVENTS.load(Ordering::Relaxed),
                );
                return Ok(fixed(Bytes::from(stats)));
            }
            _ => {}
        }
    }
    // Drain a request body so the connection can be reused; ignore its content.
    let _ = req.into_body().collect().await;
    Ok(fixed(Bytes::from_static(BODY)))
}

fn fixed(body: Bytes) -> Response<Body> {
    let mut resp = Response::new(Full::new(body).boxed_unsync());
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    resp
}

/// Counts a stream open while it exists: dropped when the body ends or the client goes away.
struct OpenStream {
    finished: bool,
}

impl OpenStream {
    /// The stream sent all its events: counted as finished when dropped.
    fn finish(&mut self) {
        self.finished = true;
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        STREAMS_OPEN.fetch_sub(1, Ordering::Relaxed);
        if self.finished {
            STREAMS_FINISHED.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// `GET /sse?n=N&gap_ms=G`.
fn sse(query: &str) -> Response<Body> {
    let (mut n, mut gap_ms) = (10u64, 100u64);
    for (k, v) in url::form_urlencoded::parse(query.as_bytes()) {
        match &*k {
            "n" => n = v.parse().unwrap_or(n),
            "gap_ms" => gap_ms = v.parse().unwrap_or(gap_ms).clamp(1, MAX_GAP_MS),
            _ => {}
        }
    }
    STREAMS_OPEN.fetch_add(1, Ordering::Relaxed);
    STREAMS_STARTED.fetch_add(1, Ordering::Relaxed);
    let mut ticks = tokio::time::interval(Duration::from_millis(gap_ms));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let state = (0u64, ticks, OpenStream { finished: false });
    let events = futures_util::stream::unfold(state, move |(i, mut ticks, mut open)| async move {
        if n != 0 && i >= n {
            open.finish();
            return None;
        }
        ticks.tick().await;
        EVENTS.fetch_add(1, Ordering::Relaxed);
        let event = Bytes::from(format!("id: {i}\ndata: {i}\n\n"));
        Some((
            Ok::<_, Infallible>(Frame::data(event)),
            (i + 1, ticks, open),
        ))
    });
    let mut resp = Response::new(BodyExt::boxed_unsync(StreamBody::new(events)));
    let headers = resp.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(
        header::CACHE_CONTROL,
        http::HeaderValue::from_static("no-cache"),
    );
    resp
}

fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let listener = TcpListener::bind(args.listen).await?;
        let mut out = std::io::stdout().lock();
        writeln!(out, "{}", listener.local_addr()?)?;
        out.flush()?;
        drop(out);
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(c) => c,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .keep_alive(true)
                    .serve_connection(TokioIo::new(stream), hyper::service::service_fn(answer))
                    .await;
            });
        }
    })
}
