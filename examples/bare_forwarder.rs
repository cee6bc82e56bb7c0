//! The floor for any proxy in `benches/run.sh`: accepts HTTP connections, forwards every
//! request to the backend through a pooled hyper-util client, and streams the response back.
//! Nothing else: no authentication, no header rules, no logging, no metrics.
//!
//! Same server and client stack, the same allocator and the same runtime settings as
//! token-exchange-proxy (hyper-util's auto connection builder, the legacy pooled client with
//! TCP_NODELAY, jemalloc, tokio's multi-thread runtime, which honours `TOKIO_WORKER_THREADS`),
//! so that the difference between the two is the proxy's own work.
//!
//! ```text
//! TOKIO_WORKER_THREADS=1 cargo run --release --example bare_forwarder -- \
//!     --listen 127.0.0.1:8081 --upstream 127.0.0.1:8000
//! ```

use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use http::{HeaderValue, Request, Response, Uri, header};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

/// The proxy binary's allocator.
#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Slow clients get this long to send request headers (as in the proxy).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Idle pooled connections to the backend are closed after this long (as in the proxy).
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// Bare HTTP forwarder for the benchmarks.
#[derive(Debug, Parser)]
struct Args {
    /// Address to listen on (port 0: any free port; the bound address is printed).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// The backend's address.
    #[arg(long)]
    upstream: SocketAddr,
}

struct Forwarder {
    client: Client<HttpConnector, Incoming>,
    base: String,
    host: HeaderValue,
}

impl Forwarder {
    async fn forward(
        &self,
        req: Request<Incoming>,
    ) -> Result<Response<Incoming>, hyper_util::client::legacy::Error> {
        let (mut parts, body) = req.into_parts();
        let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        if let Ok(uri) = format!("{}{path}", self.base).parse::<Uri>() {
            parts.uri = uri;
        }
        parts.version = http::Version::HTTP_11;
        parts.headers.insert(header::HOST, self.host.clone());
        self.client.request(Request::from_parts(parts, body)).await
    }
}

fn main() -> std::io::Result<()> {
    let args = Args::parse();
    // As the proxy does: freed pages go back on the allocator's own thread.
    #[cfg(feature = "jemalloc")]
    tikv_jemalloc_ctl::background_thread::write(true)
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_keepalive(Some(Duration::from_secs(60)));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .pool_timer(TokioTimer::new())
            .build(connector);
        let host =
            HeaderValue::from_str(&args.upstream.to_string()).map_err(std::io::Error::other)?;
        let fwd = Arc::new(Forwarder {
            client,
            base: format!("http://{}", args.upstream),
            host,
        });

        let listener = TcpListener::bind(args.listen).await?;
        let mut out = std::io::stdout().lock();
        writeln!(out, "{}", listener.local_addr()?)?;
        out.flush()?;
        drop(out);

        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_READ_TIMEOUT)
            .keep_alive(true);
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(c) => c,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let fwd = fwd.clone();
            let svc = hyper::service::service_fn(move |req| {
                let fwd = fwd.clone();
                async move { fwd.forward(req).await }
            });
            let conn = builder
                .serve_connection(TokioIo::new(stream), svc)
                .into_owned();
            tokio::spawn(async move {
                let _ = conn.await;
            });
        }
    })
}
