//! Wiring: bind the listeners, build the components, serve, drain.
//!
//! [`start`] binds both listeners (after the config was validated), builds the validator
//! and exchanger, and serves; [`Running::shutdown`] runs the drain sequence of SPEC
//! "Shutdown"; [`Running::wait`] resolves when it is over.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use http::header;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tower::ServiceBuilder;
use tower_http::sensitive_headers::SetSensitiveRequestHeadersLayer;

use crate::admin::{self, AdminState};
use crate::config::{Config, Mode};
use crate::exchange::Exchanger;
use crate::idp::{IdpClient, IdpError};
use crate::inbound::{self, Validator};
use crate::metrics::Metrics;
use crate::proxy::{self, AppState};
use crate::readiness::Readiness;
use crate::shutdown::Trigger;

/// Slow clients get this long to send request headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

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
    #[error(transparent)]
    Idp(#[from] IdpError),
    #[error(transparent)]
    Exchange(#[from] crate::exchange::SetupError),
}

/// A started proxy.
pub struct Running {
    /// The proxy listener's bound address (useful with port 0).
    pub addr: SocketAddr,
    /// The admin listener's bound address.
    pub admin_addr: SocketAddr,
    pub metrics: Arc<Metrics>,
    pub readiness: Arc<Readiness>,
    pub state: Arc<AppState>,
    shutdown: Trigger,
    task: JoinHandle<()>,
    admin_task: JoinHandle<()>,
}

impl Running {
    /// Starts the drain sequence (as SIGTERM does).
    pub fn shutdown(&self) {
        self.shutdown.fire();
    }

    /// Resolves when the drain sequence has finished and every connection is closed (or the
    /// shutdown timeout passed).
    pub async fn wait(self) {
        let _ = self.task.await;
        self.admin_task.abort();
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

    let metrics = Arc::new(Metrics::default());
    let readiness = Arc::new(Readiness::default());
    let idp = IdpClient::new(&config.idp_tls)?;

    let timing = inbound::Timing {
        // In exchange mode the exchanged-token cache entry carries the acceptance.
        remember_accepted: config.mode != Mode::Exchange,
        ..inbound::Timing::default()
    };
    let validator = Arc::new(Validator::with_timing(
        &config.inbound,
        idp.clone(),
        metrics.clone(),
        readiness.clone(),
        timing,
    ));
    validator.start();
    let exchanger = match (&config.mode, &config.exchange) {
        (Mode::Exchange, Some(ex)) => {
            let e = Arc::new(Exchanger::new(
                ex,
                &config.cache,
                idp.clone(),
                metrics.clone(),
                readiness.clone(),
            )?);
            e.start();
            Some(e)
        }
        _ => None,
    };

    let before_render: Option<Arc<dyn Fn() + Send + Sync>> = exchanger.clone().map(|e| {
        let metrics = metrics.clone();
        Arc::new(move || {
            metrics
                .cache_entries
                .store(e.entry_count(), std::sync::atomic::Ordering::Relaxed);
        }) as Arc<dyn Fn() + Send + Sync>
    });
    let admin_task = tokio::spawn(admin::serve(
        admin_listener,
        AdminState {
            metrics: metrics.clone(),
            readiness: readiness.clone(),
            before_render,
        },
    ));

    let shutdown_cfg = config.shutdown.clone();
    let state = Arc::new(AppState::new(config, metrics.clone(), validator, exchanger));
    let shutdown = Trigger::default();
    let task = tokio::spawn(serve(
        listener,
        state.clone(),
        readiness.clone(),
        shutdown.clone(),
        shutdown_cfg,
    ));

    Ok(Running {
        addr,
        admin_addr,
        metrics,
        readiness,
        state,
        shutdown,
        task,
        admin_task,
    })
}

async fn bind(what: &'static str, addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { what, addr, source })
}

/// Accepts connections until the drain delay after the trigger, then waits for in-flight
/// requests up to `shutdown.timeout`.
async fn serve(
    listener: TcpListener,
    state: Arc<AppState>,
    readiness: Arc<Readiness>,
    trigger: Trigger,
    cfg: crate::config::Shutdown,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .keep_alive(true);
    builder.http2().timer(TokioTimer::new());
    let graceful = GracefulShutdown::new();

    let stop_accepting = async {
        trigger.fired().await;
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
                let state = state.clone();
                let client = proxy::ClientIp::new(remote.ip());
                let svc = ServiceBuilder::new()
                    .layer(SetSensitiveRequestHeadersLayer::new([
                        header::AUTHORIZATION,
                        header::PROXY_AUTHORIZATION,
                        header::COOKIE,
                    ]))
                    .service(tower::service_fn(move |req: http::Request<Incoming>| {
                        let (state, client) = (state.clone(), client.clone());
                        // `map`, not an `async` block around it: the block would hold the
                        // request a second time beside the handler's future, and hyper and
                        // the layers above move this future several times per request.
                        proxy::handle(state, req, client).map(Ok::<_, Infallible>)
                    }));
                let conn = builder.serve_connection(TokioIo::new(stream), TowerToHyperService::new(svc));
                let conn = graceful.watch(conn.into_owned());
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                });
            }
            () = &mut stop_accepting => break,
        }
    }
    drop(listener);
    tracing::info!(timeout = ?cfg.timeout, "listener closed: waiting for in-flight requests");
    tokio::select! {
        () = graceful.shutdown() => tracing::info!("all connections closed"),
        () = tokio::time::sleep(cfg.timeout) => tracing::warn!("shutdown timeout reached: closing remaining connections"),
    }
}
