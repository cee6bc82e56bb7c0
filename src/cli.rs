//! The command line: `token-exchange-proxy [OPTIONS]` and `token-exchange-proxy check-config [OPTIONS]`.
//!
//! Every option can also be set in the environment as `TXP_<NAME>` (upper case, `-` → `_`);
//! repeatable options take a comma-separated list there. Precedence is
//! flag > environment > config file > default. The environment is read through a lookup
//! function so that the precedence can be tested without touching the process environment.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Validates OAuth bearer tokens, exchanges them for backend tokens (RFC 8693) and forwards
/// requests to an unmodified backend.
///
/// Every option can also be set as an environment variable TXP_<NAME> (for example
/// TXP_UPSTREAM, TXP_CLIENT_SECRET_FILE); repeatable options take a comma-separated list there.
/// Precedence: flag > environment > config file > default.
#[derive(Debug, Parser)]
#[command(name = "token-exchange-proxy", version, about, long_about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub options: Options,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Load and validate the configuration, print it (secrets are file paths, never values)
    /// and exit 0 when valid, 64 when not. With `tls`, the certificate and key files are read
    /// and must match.
    CheckConfig {
        /// Also check what only the IdP can tell: fetch discovery and the JWKS, read every
        /// secret, key and assertion file, and probe the token endpoint with the proxy's
        /// credentials; exit 69 when any of it fails, one line per failed check.
        #[arg(long)]
        online: bool,
    },
}

/// Options shared by running the proxy and `check-config`.
#[derive(Debug, Default, Clone, Args, PartialEq, Eq)]
pub struct Options {
    /// YAML config file [env: TXP_CONFIG]
    #[arg(short = 'c', long, global = true, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Proxy listener address [default: 0.0.0.0:8080] [env: TXP_LISTEN]
    #[arg(long, global = true, value_name = "ADDR")]
    pub listen: Option<String>,
    /// Health, readiness and metrics listener [default: 0.0.0.0:9090] [env: TXP_ADMIN_LISTEN]
    #[arg(long, global = true, value_name = "ADDR")]
    pub admin_listen: Option<String>,
    /// The backend, e.g. http://127.0.0.1:8000 (required) [env: TXP_UPSTREAM]
    #[arg(long, global = true, value_name = "URL")]
    pub upstream: Option<String>,
    /// Issuer of client tokens; discovery is read from it (required) [env: TXP_ISSUER]
    #[arg(long, global = true, value_name = "URL")]
    pub issuer: Option<String>,
    /// Accepted `aud` of client tokens, repeatable (required) [env: TXP_AUDIENCE]
    #[arg(long, global = true, value_name = "VALUE")]
    pub audience: Vec<String>,
    /// exchange: swap the client token for a backend token; passthrough: validate and forward
    /// the client token unchanged [default: exchange] [env: TXP_MODE]
    #[arg(long, global = true, value_name = "exchange|passthrough")]
    pub mode: Option<String>,
    /// Token endpoint for the exchange [default: from discovery] [env: TXP_TOKEN_ENDPOINT]
    #[arg(long, global = true, value_name = "URL")]
    pub token_endpoint: Option<String>,
    /// The proxy's client id at the IdP (required in exchange mode) [env: TXP_CLIENT_ID]
    #[arg(long, global = true, value_name = "ID")]
    pub client_id: Option<String>,
    /// File holding the client secret, re-read when it changes [env: TXP_CLIENT_SECRET_FILE]
    #[arg(long, global = true, value_name = "PATH")]
    pub client_secret_file: Option<String>,
    /// RFC 8693 `audience` of the exchanged token, repeatable [env: TXP_EXCHANGE_AUDIENCE]
    #[arg(long, global = true, value_name = "VALUE")]
    pub exchange_audience: Vec<String>,
    /// RFC 8693 / RFC 8707 `resource`, repeatable [env: TXP_EXCHANGE_RESOURCE]
    #[arg(long, global = true, value_name = "URL")]
    pub exchange_resource: Vec<String>,
    /// RFC 8693 `scope`, space-separated [env: TXP_EXCHANGE_SCOPE]
    #[arg(long, global = true, value_name = "\"a b\"")]
    pub exchange_scope: Option<String>,
    /// Log format [default: json] [env: TXP_LOG_FORMAT]
    #[arg(long, global = true, value_name = "text|json")]
    pub log_format: Option<String>,
    /// Tracing filter, e.g. info,token_exchange_proxy=debug [default: info] [env: TXP_LOG_LEVEL]
    #[arg(long, global = true, value_name = "FILTER")]
    pub log_level: Option<String>,
}

impl Options {
    /// Reads the `TXP_*` variables through `lookup` (the process environment in production).
    pub fn from_env(lookup: impl Fn(&str) -> Option<String>) -> Self {
        let one = |name: &str| lookup(name).filter(|v| !v.is_empty());
        let many = |name: &str| {
            one(name)
                .map(|v| {
                    v.split(',')
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                        .map(String::from)
                        .collect()
                })
                .unwrap_or_default()
        };
        Options {
            config: one("TXP_CONFIG").map(PathBuf::from),
            listen: one("TXP_LISTEN"),
            admin_listen: one("TXP_ADMIN_LISTEN"),
            upstream: one("TXP_UPSTREAM"),
            issuer: one("TXP_ISSUER"),
            audience: many("TXP_AUDIENCE"),
            mode: one("TXP_MODE"),
            token_endpoint: one("TXP_TOKEN_ENDPOINT"),
            client_id: one("TXP_CLIENT_ID"),
            client_secret_file: one("TXP_CLIENT_SECRET_FILE"),
            exchange_audience: many("TXP_EXCHANGE_AUDIENCE"),
            exchange_resource: many("TXP_EXCHANGE_RESOURCE"),
            exchange_scope: one("TXP_EXCHANGE_SCOPE"),
            log_format: one("TXP_LOG_FORMAT"),
            log_level: one("TXP_LOG_LEVEL"),
        }
    }

    /// Layers `self` (higher precedence) over `lower`: a value set here wins, an unset one
    /// falls through. A repeatable option set here replaces the whole list below.
    pub fn over(self, lower: Options) -> Options {
        fn list(hi: Vec<String>, lo: Vec<String>) -> Vec<String> {
            if hi.is_empty() { lo } else { hi }
        }
        Options {
            config: self.config.or(lower.config),
            listen: self.listen.or(lower.listen),
            admin_listen: self.admin_listen.or(lower.admin_listen),
            upstream: self.upstream.or(lower.upstream),
            issuer: self.issuer.or(lower.issuer),
            audience: list(self.audience, lower.audience),
            mode: self.mode.or(lower.mode),
            token_endpoint: self.token_endpoint.or(lower.token_endpoint),
            client_id: self.client_id.or(lower.client_id),
            client_secret_file: self.client_secret_file.or(lower.client_secret_file),
            exchange_audience: list(self.exchange_audience, lower.exchange_audience),
            exchange_resource: list(self.exchange_resource, lower.exchange_resource),
            exchange_scope: self.exchange_scope.or(lower.exchange_scope),
            log_format: self.log_format.or(lower.log_format),
            log_level: self.log_level.or(lower.log_level),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn options_parse_after_the_subcommand() {
        let cli = Cli::try_parse_from([
            "token-exchange-proxy",
            "check-config",
            "--config",
            "x.yaml",
            "--audience",
            "a",
            "--audience",
            "b",
        ])
        .expect("parses");
        assert!(matches!(
            cli.command,
            Some(Command::CheckConfig { online: false })
        ));
        assert_eq!(cli.options.config, Some(PathBuf::from("x.yaml")));
        assert_eq!(cli.options.audience, vec!["a", "b"]);
    }

    #[test]
    fn flag_beats_environment_and_lists_split_on_commas() {
        let env = |k: &str| match k {
            "TXP_LISTEN" => Some("127.0.0.1:1".to_string()),
            "TXP_UPSTREAM" => Some("http://127.0.0.1:2".to_string()),
            "TXP_AUDIENCE" => Some("x, y".to_string()),
            _ => None,
        };
        let flags = Cli::try_parse_from(["token-exchange-proxy", "--listen", "127.0.0.1:3"])
            .expect("parses")
            .options;
        let merged = flags.over(Options::from_env(env));
        assert_eq!(merged.listen.as_deref(), Some("127.0.0.1:3"));
        assert_eq!(merged.upstream.as_deref(), Some("http://127.0.0.1:2"));
        assert_eq!(merged.audience, vec!["x", "y"]);
    }
}
