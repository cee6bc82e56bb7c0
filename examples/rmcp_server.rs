//! An MCP server built on `rmcp` (streamable HTTP at `/mcp`) protected in-process by the
//! proxy's two security layers instead of a sidecar (README "Use as a library").
//!
//! ```text
//! cargo run --release --example rmcp_server -- --config config/example.yaml
//! ```
//!
//! The config file is the proxy's: `listen`, `mode`, `inbound`, `exchange`, `idp_tls`,
//! `cache`, `public_url`, `protected_resource`, `shutdown` and `log` mean what they mean there
//! (`TXP_*` variables too); `upstream` is ignored, as nothing is forwarded. The request path:
//!
//! | layer | request | response |
//! |---|---|---|
//! | tower-http `SetSensitiveRequestHeaders` | marks `Authorization`, `Proxy-Authorization`, `Cookie` sensitive | |
//! | [`ProtectedResourceLayer`] | answers the RFC 9728 metadata document | |
//! | `BearerAuthLayer` | validates the bearer token, or answers the challenge | |
//! | `TokenExchangeLayer` (exchange mode) | swaps in the exchanged token, or answers the failure | |
//! | [`mounted`] | `/mcp` to rmcp's `StreamableHttpService`, 404 elsewhere | |
//!
//! Its one tool, `whoami`, answers `{"sub", "aud", "act"}`: the claims of the token its handler
//! received (in exchange mode the exchanged one, never the client's).

use std::convert::Infallible;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use http::request::Parts;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::handler::server::tool::Extension;
use rmcp::handler::server::wrapper::Json;
use rmcp::model::{ServerCapabilities, ServerConfig};
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use rmcp::{ErrorData, ServerHandler, schemars, tool, tool_handler, tool_router};
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tower::{ServiceBuilder, ServiceExt as _};
use tower_http::sensitive_headers::SetSensitiveRequestHeadersLayer;

use token_exchange_proxy::cli::Options;
use token_exchange_proxy::config::raw::{RawConfig, RawUpstream};
use token_exchange_proxy::config::{self, Config, ConfigError};
use token_exchange_proxy::error::{Outcome, Responder};
use token_exchange_proxy::inbound::{bearer_token, jwt};
use token_exchange_proxy::protection::SetupError;
use token_exchange_proxy::proxy::{SENSITIVE_HEADERS, exchange_or_passthrough};
use token_exchange_proxy::shutdown::Drain;
use token_exchange_proxy::{ProtectedResourceLayer, Protection, logging, server, shutdown};

/// Exit code for an invalid configuration (BSD `EX_USAGE`), as the proxy binary.
const EXIT_CONFIG: u8 = 64;
/// Exit code for a failure to start.
const EXIT_START: u8 = 1;
/// The path of the MCP endpoint; the RFC 9728 resource is the origin plus this path.
pub const MCP_PATH: &str = "/mcp";
/// Stands in for the ignored `upstream.url` so that the proxy's validation passes; nothing
/// ever connects to it (port 9 is the discard service).
const NO_UPSTREAM: &str = "http://127.0.0.1:9";
/// Hosts rmcp accepts in `Host` besides those of `public_url` and
/// `protected_resource.resource` (its defence against DNS rebinding).
const LOOPBACK_HOSTS: [&str; 3] = ["localhost", "127.0.0.1", "::1"];

/// An MCP server protected by token-exchange-proxy's layers.
#[derive(Debug, Parser)]
struct Args {
    /// The proxy's YAML config file (`upstream` is ignored)
    #[arg(short = 'c', long, env = "TXP_CONFIG", value_name = "PATH")]
    config: PathBuf,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let raw = config::read_file(&args.config)
        .map(|raw| config::apply(raw, &Options::from_env(|k| std::env::var(k).ok())));
    let config = match raw.and_then(validate) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    logging::init(&config.log);
    let code = run(config).await;
    logging::flush();
    code
}

/// Binds `listen`, serves until SIGTERM or SIGINT, drains.
async fn run(config: Config) -> ExitCode {
    let bound = match TcpListener::bind(config.listen).await {
        Ok(listener) => listener.local_addr().map(|addr| (listener, addr)),
        Err(e) => Err(e),
    };
    let (listener, addr) = match bound {
        Ok(bound) => bound,
        Err(e) => {
            tracing::error!(error = %e, listen = %config.listen, "cannot bind the listener");
            return ExitCode::from(EXIT_START);
        }
    };
    let server = match start(&config, listener) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, source = ?std::error::Error::source(&e).map(ToString::to_string), "start-up failed");
            return ExitCode::from(EXIT_START);
        }
    };
    tracing::info!(listen = %addr, path = MCP_PATH, "serving");
    shutdown::signal().await;
    // The drain sequence of README "Shutdown".
    server.shutdown.requested.fire();
    let _ = server.task.await;
    tracing::info!("shut down cleanly");
    ExitCode::SUCCESS
}

/// Validates `raw` as the proxy does, `upstream` aside: whatever it says is replaced by a
/// placeholder, since this server forwards nothing.
pub fn validate(mut raw: RawConfig) -> Result<Config, ConfigError> {
    raw.upstream = RawUpstream {
        url: Some(NO_UPSTREAM.to_owned()),
        ..RawUpstream::default()
    };
    config::validate(raw)
}

/// A started server.
pub struct Server {
    /// The validator and exchanger behind the layers (readiness, metrics).
    pub protection: Protection,
    /// `requested` fired starts the drain sequence (as SIGTERM does).
    pub shutdown: Drain,
    /// Ends when the drain is over.
    pub task: JoinHandle<()>,
}

/// Builds the layers from `config` and serves the MCP endpoint behind them on `listener`.
/// Needs a tokio runtime.
pub fn start(config: &Config, listener: TcpListener) -> Result<Server, SetupError> {
    let protection = Protection::start(config)?;
    let mcp_config = mcp_config(config);
    let stop_mcp = mcp_config.cancellation_token.clone();
    let mcp = StreamableHttpService::new(
        || Ok(Whoami::new()),
        Arc::new(LocalSessionManager::default()),
        mcp_config,
    );
    let app = ServiceBuilder::new()
        .layer(SetSensitiveRequestHeadersLayer::new(SENSITIVE_HEADERS))
        .layer(ProtectedResourceLayer::new(protection.resource.clone()))
        .layer(protection.bearer_auth())
        .layer(exchange_or_passthrough(&protection))
        .service(mounted(mcp));

    let drain = Drain::default();
    let task = tokio::spawn(server::serve(
        listener,
        move |_| app.clone(),
        None,
        protection.readiness.clone(),
        drain.clone(),
        config.shutdown.clone(),
        protection.metrics.clone(),
    ));
    // When the listener closes, rmcp ends its sessions, so that their open SSE streams do not
    // hold the drain up until `shutdown.timeout`.
    let closing = drain.closing.clone();
    tokio::spawn(async move {
        closing.fired().await;
        stop_mcp.cancel();
    });
    Ok(Server {
        protection,
        shutdown: drain,
        task,
    })
}

/// rmcp's settings: `Host` may name loopback or the configured public origins.
fn mcp_config(config: &Config) -> StreamableHttpServerConfig {
    let host = |u: &url::Url| u.host_str().map(str::to_owned);
    let public = [
        config.public_url.as_ref().and_then(host),
        config
            .protected_resource
            .resource
            .as_deref()
            .and_then(|r| url::Url::parse(r).ok())
            .as_ref()
            .and_then(host),
    ];
    let hosts = LOOPBACK_HOSTS
        .map(str::to_owned)
        .into_iter()
        .chain(public.into_iter().flatten());
    StreamableHttpServerConfig::default().with_allowed_hosts(hosts)
}

/// The response body of rmcp's service.
type McpBody = http_body_util::combinators::BoxBody<bytes::Bytes, Infallible>;

/// `mcp` at exactly [`MCP_PATH`]; 404 for any other path.
pub fn mounted<S>(
    mcp: S,
) -> impl tower::Service<
    Request<Incoming>,
    Response = http::Response<McpBody>,
    Error = Infallible,
    Future = impl Send,
> + Clone
+ Send
+ 'static
where
    S: tower::Service<Request<Incoming>, Response = http::Response<McpBody>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
{
    tower::service_fn(move |req: Request<Incoming>| {
        let mcp = mcp.clone();
        async move {
            if req.uri().path() == MCP_PATH {
                return mcp.oneshot(req).await;
            }
            let resp = Responder::plain(
                StatusCode::NOT_FOUND,
                "not_found",
                "no such endpoint",
                Outcome("not_found"),
            );
            Ok(resp.map(|body| body.boxed()))
        }
    })
}

/// What `whoami` answers: claims of the token the handler received, `null` when absent.
#[derive(Debug, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
pub struct Identity {
    /// The subject (RFC 7519 §4.1.2).
    pub sub: Value,
    /// The audience (RFC 7519 §4.1.3).
    pub aud: Value,
    /// The acting party of a delegation (RFC 8693 §4.1).
    pub act: Value,
}

/// The MCP server: one tool.
#[derive(Debug, Clone)]
pub struct Whoami {
    tool_router: ToolRouter<Self>,
}

impl Default for Whoami {
    fn default() -> Self {
        Self::new()
    }
}

#[tool_router]
impl Whoami {
    /// The server with its tools.
    pub fn new() -> Self {
        Self {
            tool_router: Self::tool_router(),
        }
    }

    /// The `sub`, `aud` and `act` of the bearer token of the HTTP request that carried the
    /// call (rmcp puts its [`Parts`] into the request context).
    #[tool(description = "The sub, aud and act claims of the token this server received")]
    fn whoami(&self, Extension(parts): Extension<Parts>) -> Result<Json<Identity>, ErrorData> {
        identity(&parts.headers)
            .map(Json)
            .ok_or_else(|| ErrorData::invalid_request("no bearer JWT in the request", None))
    }
}

#[tool_handler(router = self.tool_router)]
impl ServerHandler for Whoami {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
    }
}

/// The claims of the `Authorization: Bearer` JWT in `headers`, decoded **without
/// verification**, for display only: the layers in front have validated the client's token
/// and put the exchanged one in its place. `None` without a bearer JWT.
pub fn identity(headers: &HeaderMap) -> Option<Identity> {
    let token = bearer_token(headers, usize::MAX).ok()?;
    let payload = jwt::decode_segment(jwt::split(token)?.payload).ok()?;
    let mut claims: serde_json::Map<String, Value> = jwt::parse_json(&payload).ok()?;
    let mut claim = |name: &str| claims.remove(name).unwrap_or(Value::Null);
    Some(Identity {
        sub: claim("sub"),
        aud: claim("aud"),
        act: claim("act"),
    })
}
