//! A fake identity provider for `benches/run.sh`: OIDC discovery, a JWKS with one P-256 key,
//! an RFC 8693 token endpoint that waits `--delay-ms` and then issues a token with
//! `expires_in`, ES256 client tokens on demand (`GET /mint?n=N&tag=T`, one per line) and
//! call counters (`GET /stats`).
//!
//! Prints its issuer URL (`http://127.0.0.1:PORT`) on the first line of stdout once it
//! accepts connections. Runs on one thread: it shares a core with the load generator.
//!
//! ```text
//! cargo run --release --example bench_idp -- --listen 127.0.0.1:0 --delay-ms 5
//! ```

use std::io::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;

#[allow(dead_code)]
#[path = "../benches/support/fake_idp.rs"]
mod fake_idp;

/// Fake IdP for the benchmarks.
#[derive(Debug, Parser)]
struct Args {
    /// Address to listen on (port 0: any free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Time the token endpoint waits before answering, in milliseconds.
    #[arg(long, default_value_t = 5)]
    delay_ms: u64,
    /// Approximate length of minted and issued tokens (0: unpadded, about 350 characters).
    #[arg(long, default_value_t = fake_idp::DEFAULT_TOKEN_BYTES)]
    token_bytes: usize,
}

fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let (idp, listener) = fake_idp::FakeIdp::bind(
            args.listen,
            Duration::from_millis(args.delay_ms),
            args.token_bytes,
        )
        .await?;
        let mut out = std::io::stdout().lock();
        writeln!(out, "{}", idp.issuer())?;
        out.flush()?;
        drop(out);
        idp.serve(listener).await;
        Ok(())
    })
}
