//! The pooled HTTP/1.1 client to the backend.

use std::time::Duration;

use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use crate::config::Upstream;
use crate::metrics::UpstreamErrorKind;

/// Idle keep-alive connections to the backend are closed after this long.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// A keep-alive pool of connections to the backend.
pub type UpstreamClient = Client<HttpConnector, Incoming>;

/// Builds the client: connect timeout from the config, TCP_NODELAY, pooled keep-alive.
pub fn client(config: &Upstream) -> UpstreamClient {
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(config.connect_timeout));
    connector.set_nodelay(true);
    connector.set_keepalive(Some(Duration::from_secs(60)));
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(POOL_IDLE_TIMEOUT)
        .pool_timer(hyper_util::rt::TokioTimer::new())
        .build(connector)
}

/// Classifies a failed request to the backend.
pub fn classify(e: &hyper_util::client::legacy::Error) -> UpstreamErrorKind {
    if e.is_connect() {
        UpstreamErrorKind::Connect
    } else {
        UpstreamErrorKind::Protocol
    }
}
