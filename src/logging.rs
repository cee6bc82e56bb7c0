//! Log set-up: JSON or text lines on stdout, filtered by `log.level`.
//!
//! Nothing the proxy logs contains a token, a secret, an `Authorization` or `Cookie` value or a
//! query string: the access line carries the path only, and errors are logged by kind.

use tracing_subscriber::EnvFilter;

use crate::config::{Log, LogFormat};

/// Installs the global subscriber. Call once, from `main`.
pub fn init(config: &Log) {
    let filter = EnvFilter::try_new(&config.level).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stdout);
    match config.format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .init(),
        LogFormat::Text => builder.with_ansi(false).init(),
    }
}
