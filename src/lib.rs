//! token-exchange-proxy: a sidecar that validates OAuth bearer tokens, exchanges them for
//! backend tokens (RFC 8693) and forwards requests to an unmodified backend, streaming bodies
//! both ways.
//!
//! The request path is a `tower` stack ([`proxy::layers`]). Its two security layers are
//! public and work in front of any `tower::Service<http::Request<B>>` (README "Use as a
//! library"): [`BearerAuthLayer`] validates the client's token, [`TokenExchangeLayer`] swaps
//! it for an exchanged one. [`Protection::start`] builds both from the config; the binary
//! starts with [`server::start`].

pub mod admin;
pub mod cli;
pub mod config;
pub mod error;
pub mod exchange;
#[doc(hidden)]
pub mod fuzzing;
pub mod idp;
pub mod inbound;
pub mod logging;
pub mod metadata;
pub mod metrics;
pub mod online;
pub mod protection;
pub mod proxy;
pub mod readiness;
pub mod response;
pub mod secret;
pub mod server;
pub mod shutdown;
pub mod telemetry;
pub mod tls;

pub use exchange::TokenExchangeLayer;
pub use inbound::BearerAuthLayer;
pub use metadata::ProtectedResourceLayer;
pub use protection::Protection;
