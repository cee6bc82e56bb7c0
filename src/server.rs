//! Wiring: bind the listeners, build the components, serve, drain.
//!
//! [`start`] binds both listeners (after the config was validated), loads the listener's TLS
//! pair when `tls` is configured ([`Tls`], README "HTTPS"), builds the validator and exchanger
//! ([`Protection`]) and the request path ([`proxy::layers`]), and serves;
//! [`Running::shutdown`] runs the drain sequence of README "Shutdown"; [`Running::wait`]
//! resolves when it is over.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::future::BoxFuture;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::admin::{self, AdminState};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::protection::{Protection, SetupError};
use crate::proxy::{self, ClientIp, Forward, Upstream};
use crate::readiness::Readiness;
use crate::shutdown::Drain;
use crate::tls::{Tls, TlsError};

/// Slow clients get this long to send request headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// A handshake is a few round trips: a client gets as long for it as for its request headers.
const TLS_HANDSHAKE_TIMEOUT: Duration = HEADER_READ_TIMEOUT;

/// Why the proxy could not start (exit code 1).
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot bind {what} listener on {addr}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot serve HTTPS: {}", .0.key())]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Setup(#[from] SetupError),
}

/// A started proxy.
pub struct Running {
    /// The proxy listener's bound address (useful with port 0).
    pub addr: SocketAddr,
    /// The admin listener's bound address.
    pub admin_addr: SocketAddr,
    pub metrics: Arc<Metrics>,
    pub readiness: Arc<Readiness>,
    /// The validator and exchanger behind the layers.
    pub protection: Protection,
    drain: Drain,
    task: JoinHandle<()>,
    admin_task: JoinHandle<()>,
    /// Re-reads the TLS pair when its files change (`tls` configured).
    tls_task: Option<JoinHandle<()>>,
}

impl Running {
    /// Starts the drain sequence (as SIGTERM does).
    pub fn shutdown(&self) {
        self.drain.requested.fire();
    }

    /// Resolves when the drain sequence has finished and every connection is closed (or the
    /// shutdown timeout passed).
    pub async fn wait(self) {
        let _ = self.task.await;
        self.admin_task.abort();
        if let Some(t) = &self.tls_task {
            t.abort();
        }
        // The spans of the last requests (README "Traces").
        if let Some(telemetry) = &self.protection.telemetry {
            telemetry.flush(crate::telemetry::FLUSH_TIMEOUT).await;
        }
    }
}

/// Binds, builds and serves. Returns once both listeners accept connections.
pub async fn start(config: Config) -> Result<Running, StartError> {
    let listener = bind("proxy", config.listen).await?;
    let admin_listener = bind("admin", config.admin_listen).await?;
    let addr = listener.local_addr().map_err(|source| StartError::Bind {
        what: "proxy",
        addr: config.listen,
        source,
    })?;
    let admin_addr = admin_listener
        .local_addr()
        .map_err(|source| StartError::Bind {
            what: "admin",
            addr: config.admin_listen,
            source,
        })?;

    let tls = config.tls.as_ref().map(Tls::load).transpose()?;
    let protection = Protection::start(&config)?;
    let metrics = protection.metrics.clone();
    let readiness = protection.readiness.clone();

    // The exchanged-token cache gauge counts the entries of every profile.
    let exchangers: Vec<_> = protection.exchangers().cloned().collect();
    let before_render: Option<admin::BeforeRender> = (!exchangers.is_empty()).then(|| {
        let (exchangers, metrics) = (Arc::new(exchangers), metrics.clone());
        Arc::new(move || -> BoxFuture<'static, ()> {
            let (exchangers, metrics) = (exchangers.clone(), metrics.clone());
            Box::pin(async move {
                let mut entries = 0;
                for e in exchangers.iter() {
                    e.sync().await;
                    entries += e.entry_count();
                }
                metrics
                    .cache_entries
                    .store(entries, std::sync::atomic::Ordering::Relaxed);
            })
        }) as admin::BeforeRender
    });
    let admin_task = tokio::spawn(admin::serve(
        admin_listener,
        AdminState {
            metrics: metrics.clone(),
            readiness: readiness.clone(),
            before_render,
            purge: Some({
                let protection = protection.clone();
                Arc::new(move |sub: Option<String>| {
                    let protection = protection.clone();
                    Box::pin(async move { protection.purge(sub.as_deref()).await })
                        as futures_util::future::BoxFuture<'static, u64>
                }) as admin::Purge
            }),
        },
    ));

    let drain = Drain::default();
    let layers = proxy::layers(&protection, &config, &drain);
    let upstream = Arc::new(Upstream::new(&config, metrics.clone()));
    let trusted: Arc<[ipnet::IpNet]> = config.trusted_proxies.clone().into();
    let acceptor = tls.as_ref().map(Tls::acceptor);
    let tls_task = tls.map(|tls| {
        tracing::info!(serial = %tls.serial(), "serving HTTPS");
        tokio::spawn(tls.watch(metrics.clone()))
    });
    let task = tokio::spawn(serve(
        listener,
        move |peer| {
            let peer = ClientIp::new(peer, &trusted);
            layers.service(Forward::new(upstream.clone(), peer))
        },
        acceptor,
        readiness.clone(),
        drain.clone(),
        config.shutdown.clone(),
        metrics.clone(),
    ));

    Ok(Running {
        addr,
        admin_addr,
        metrics,
        readiness,
        protection,
        drain,
        task,
        admin_task,
        tls_task,
    })
}

async fn bind(what: &'static str, addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { what, addr, source })
}

/// Serves `make_service(client address)` on every connection accepted from `listener`
/// (HTTP/1.1 and h2c; with `tls`, HTTP/1.1 and HTTP/2 inside TLS) until the drain delay after
/// `drain.requested`, then fires `drain.closing` and waits for in-flight requests up to
/// `shutdown.timeout`. Marks `readiness` draining when the drain is requested.
///
/// A TLS handshake runs in the connection's own task, so a slow client never holds up the
/// accept loop, and gets [`TLS_HANDSHAKE_TIMEOUT`].
///
/// Keeps `metrics.open_connections` (`txp_open_connections`) at the number of connections
/// whose task is running: it goes back to where it was once every connection, however it
/// ended (closed, reset, timed out, cut at shutdown), is gone.
pub async fn serve<M, S, B>(
    listener: TcpListener,
    make_service: M,
    tls: Option<tokio_rustls::TlsAcceptor>,
    readiness: Arc<Readiness>,
    drain: Drain,
    cfg: crate::config::Shutdown,
    metrics: Arc<Metrics>,
) where
    M: Fn(std::net::IpAddr) -> S,
    S: tower::Service<
            http::Request<hyper::body::Incoming>,
            Response = http::Response<B>,
            Error = std::convert::Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .keep_alive(true);
    builder.http2().timer(TokioTimer::new());
    let builder = Arc::new(builder);
    let graceful = GracefulShutdown::new();
    // Every connection's task, so that those still open at the shutdown timeout can be ended
    // here, before the process exits: their responses' access lines are written as they go.
    let mut connections = tokio::task::JoinSet::new();

    let stop_accepting = async {
        drain.requested.fired().await;
        readiness.drain();
        tracing::info!(drain_delay = ?cfg.drain_delay, "shutdown requested: not ready, still serving");
        tokio::time::sleep(cfg.drain_delay).await;
    };
    tokio::pin!(stop_accepting);

    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, remote) = match accepted {
                    Ok(conn) => conn,
                    Err(e) => {
                        // EMFILE and the like: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let svc = TowerToHyperService::new(make_service(remote.ip()));
                // Taken here, before any shutdown can begin: a connection whose handshake
                // ends after it is still told to close.
                let watcher = graceful.watcher();
                let (builder, tls) = (builder.clone(), tls.clone());
                let open = OpenConnection::new(metrics.clone());
                connections.spawn(async move {
                    let _open = open;
                    let ended = match tls {
                        None => {
                            let conn = builder.serve_connection(TokioIo::new(stream), svc);
                            watcher.watch(conn.into_owned()).await
                        }
                        Some(acceptor) => {
                            let accept = acceptor.accept(stream);
                            let handshake = tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, accept);
                            let stream = match handshake.await {
                                Ok(Ok(stream)) => stream,
                                Ok(Err(e)) => {
                                    tracing::debug!(error = %e, "TLS handshake failed");
                                    return;
                                }
                                Err(_) => {
                                    tracing::debug!("TLS handshake timed out");
                                    return;
                                }
                            };
                            let conn = builder.serve_connection(TokioIo::new(stream), svc);
                            watcher.watch(conn.into_owned()).await
                        }
                    };
                    if let Err(e) = ended {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                });
            }
            // A connection's task is released as soon as it ends: a finished task keeps its
            // whole allocation (the connection's future) until it is joined, and after a peak
            // of connections nothing else may come to join them (README "Reliability").
            Some(ended) = connections.join_next(), if !connections.is_empty() => {
                if let Err(e) = ended
                    && e.is_panic()
                {
                    tracing::error!("a connection's task panicked");
                }
            }
            () = &mut stop_accepting => break,
        }
    }
    drop(listener);
    drain.closing.fire();
    tracing::info!(timeout = ?cfg.timeout, "listener closed: waiting for in-flight requests");
    tokio::select! {
        () = graceful.shutdown() => tracing::info!("all connections closed"),
        () = tokio::time::sleep(cfg.timeout) => tracing::warn!("shutdown timeout reached: closing remaining connections"),
    }
    // Cut what is left (long SSE streams): each cut response still writes its access line.
    connections.abort_all();
    while connections.join_next().await.is_some() {}
}

/// One open connection in `txp_open_connections`: counted when made, uncounted when dropped,
/// which happens however its task ends (finished, failed, or aborted at the shutdown timeout).
struct OpenConnection(Arc<Metrics>);

impl OpenConnection {
    fn new(metrics: Arc<Metrics>) -> Self {
        metrics.open_connections.fetch_add(1, Ordering::Relaxed);
        Self(metrics)
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.open_connections.fetch_sub(1, Ordering::Relaxed);
    }
}
