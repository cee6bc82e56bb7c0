//! token-exchange-proxy: a sidecar that validates OAuth bearer tokens, exchanges them for
//! backend tokens (RFC 8693) and forwards requests to an unmodified backend, streaming bodies
//! both ways.
//!
//! Start with [`server::start`]; the request path is [`proxy::handle`].

pub mod admin;
pub mod cli;
pub mod config;
pub mod error;
pub mod exchange;
pub mod idp;
pub mod inbound;
pub mod logging;
pub mod metrics;
pub mod proxy;
pub mod readiness;
pub mod secret;
pub mod server;
pub mod shutdown;
