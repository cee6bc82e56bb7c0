//! `token-exchange-proxy`: parse arguments, load the config (exit 64 when invalid), run until
//! SIGTERM/SIGINT, drain, exit 0. `check-config` stops after the config and the `tls` pair
//! (and, with `--online`, after the checks only the IdP can answer: exit 69 when one fails).

use std::process::ExitCode;

use clap::Parser;
use token_exchange_proxy::cli::{Cli, Command, Options};
use token_exchange_proxy::{config, logging, online, server, shutdown, tls};

/// The allocator (README "Reliability": memory after a peak).
#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Exit code for an invalid configuration (BSD `EX_USAGE`).
const EXIT_CONFIG: u8 = 64;
/// Exit code for a failure to start.
const EXIT_START: u8 = 1;
/// Exit code for a failed online check: a service the proxy needs is unavailable or refuses
/// it (BSD `EX_UNAVAILABLE`).
const EXIT_ONLINE: u8 = 69;

/// `check-config --online`: one line per failed check on stderr; 0 when all pass, else 69.
fn check_online(config: &config::Config) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::from(EXIT_START);
        }
    };
    let failures = runtime.block_on(online::check(config));
    for f in &failures {
        eprintln!("{f}");
    }
    if failures.is_empty() {
        println!("# online checks passed");
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_ONLINE)
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let options = cli
        .options
        .over(Options::from_env(|k| std::env::var(k).ok()));
    let config = match config::load(&options) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if let Some(Command::CheckConfig { online }) = cli.command {
        // The one pair of files checked offline: a listener without a usable certificate
        // would serve nothing (README "HTTPS").
        let tls_note = match config.tls.as_ref().map(tls::check).transpose() {
            Ok(serial) => serial
                .map(|s| format!("# tls: the key matches the certificate (serial {s})\n"))
                .unwrap_or_default(),
            Err(e) => {
                let problems = vec![e.problem()];
                eprintln!("{}", config::ConfigError { problems });
                return ExitCode::from(EXIT_CONFIG);
            }
        };
        match serde_yaml_ng::to_string(&config) {
            Ok(text) => println!(
                "# configuration is valid (secrets are file paths; no value is shown)\n{tls_note}{text}"
            ),
            Err(e) => {
                eprintln!("cannot print the configuration: {e}");
                return ExitCode::from(EXIT_CONFIG);
            }
        }
        return if online {
            check_online(&config)
        } else {
            ExitCode::SUCCESS
        };
    }
    logging::init(&config.log);
    // jemalloc's background thread purges freed pages on its own clock (its decay, 10 s by
    // default): without it they go back only while the process keeps allocating, so an idle
    // proxy would keep the memory of its last peak.
    #[cfg(feature = "jemalloc")]
    if let Err(e) = tikv_jemalloc_ctl::background_thread::write(true) {
        tracing::warn!(error = %e, "cannot start the allocator's background thread: freed memory is given back only under load");
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::from(EXIT_START);
        }
    };
    runtime.block_on(async move {
        let running = match server::start(config).await {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, source = ?std::error::Error::source(&e).map(ToString::to_string), "start-up failed");
                logging::flush();
                return ExitCode::from(EXIT_START);
            }
        };
        tracing::info!(listen = %running.addr, admin = %running.admin_addr, "serving");
        shutdown::signal().await;
        running.shutdown();
        running.wait().await;
        tracing::info!("shut down cleanly");
        logging::flush();
        ExitCode::SUCCESS
    })
}
