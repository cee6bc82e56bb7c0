//! The load generator of `benches/run.sh` for what `wrk` cannot do: latency at a fixed
//! request rate, sending each token exactly once, a burst of concurrent requests, and time to
//! readiness. Each subcommand prints one JSON object on stdout.
//!
//! - `rate`: open-loop load at `--rate` requests/s over `--connections` keep-alive
//!   connections, tokens from `--tokens` round-robin. A request's latency is measured from
//!   the moment it was due to be sent, so waiting for a free connection counts (no
//!   coordinated omission as long as the generator keeps up; `achieved_rps` shows whether it
//!   did). Prints p50/p90/p99/max in microseconds.
//! - `once`: every token of `--tokens` once, `--concurrency` at a time (cache warming, filling).
//! - `burst`: opens `--n` connections first, then sends one request on each at the same
//!   moment, all with the single token in `--tokens`.
//! - `startup`: starts the command after `--` `--runs` times and measures the time until
//!   `--ready-url` answers 200, then kills it.
//! - `soak`: event streams, POSTs and hostile connections at once, with the proxy's memory,
//!   file descriptors and connections sampled (`benches/soak.sh`; see `support/soak.rs`).
//!
//! ```text
//! cargo run --release --example bench_load -- rate --url http://127.0.0.1:8080/ \
//!     --tokens tokens.txt --rate 1000 --duration 10
//! ```

use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::{Parser, Subcommand};
use http::{HeaderValue, Request, Uri, header};
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::SendRequest;
use tokio::sync::{Mutex, mpsc};

#[path = "support/soak.rs"]
mod soak;

/// Load generator for the benchmarks.
#[derive(Debug, Parser)]
struct Args {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Open-loop load at a fixed rate; prints latency percentiles.
    Rate {
        #[arg(long)]
        url: Uri,
        /// File with one token per line.
        #[arg(long)]
        tokens: PathBuf,
        /// Requests per second.
        #[arg(long, default_value_t = 1000)]
        rate: u64,
        /// Measured seconds (after the warm-up).
        #[arg(long, default_value_t = 10)]
        duration: u64,
        /// Seconds of load before measuring.
        #[arg(long, default_value_t = 2)]
        warmup: u64,
        /// Keep-alive connections.
        #[arg(long, default_value_t = 32)]
        connections: usize,
    },
    /// Every token once, with bounded concurrency.
    Once {
        #[arg(long)]
        url: Uri,
        #[arg(long)]
        tokens: PathBuf,
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
    },
    /// One request on each of `n` connections, all at once, with one token.
    Burst {
        #[arg(long)]
        url: Uri,
        #[arg(long)]
        tokens: PathBuf,
        #[arg(long, default_value_t = 1000)]
        n: usize,
    },
    /// Streams, POSTs and hostile connections at once; samples the proxy's resources.
    Soak(soak::SoakArgs),
    /// Time from process start to the ready URL answering 200.
    Startup {
        /// e.g. http://127.0.0.1:9090/readyz
        #[arg(long)]
        ready_url: Uri,
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// Give up on one run after this many seconds.
        #[arg(long, default_value_t = 30)]
        timeout: u64,
        /// The command to start.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
}

/// What a worker needs to send requests.
struct Target {
    addr: SocketAddr,
    host: HeaderValue,
    path: String,
}

impl Target {
    fn new(url: &Uri) -> Result<Self, String> {
        let authority = url.authority().ok_or("the URL has no host:port")?;
        let addr: SocketAddr = authority
            .as_str()
            .parse()
            .map_err(|_| "the URL's host must be an IP address with a port")?;
        let host = HeaderValue::from_str(authority.as_str()).map_err(|e| e.to_string())?;
        let path = url.path_and_query().map_or("/", |p| p.as_str()).to_owned();
        Ok(Self { addr, host, path })
    }

    async fn connect(&self) -> Option<SendRequest<Empty<Bytes>>> {
        soak::connect(self.addr).await
    }

    /// Sends one GET with `authorization`, reads the whole body; the status, or `None` on a
    /// transport error.
    async fn send(
        &self,
        sender: &mut SendRequest<Empty<Bytes>>,
        authorization: &HeaderValue,
    ) -> Option<u16> {
        sender.ready().await.ok()?;
        let req = Request::get(self.path.as_str())
            .header(header::HOST, self.host.clone())
            .header(header::AUTHORIZATION, authorization.clone())
            .body(Empty::<Bytes>::new())
            .ok()?;
        let resp = sender.send_request(req).await.ok()?;
        let status = resp.status().as_u16();
        resp.into_body().collect().await.ok()?;
        Some(status)
    }
}

/// Reads `Bearer <token>` header values, one per non-empty line.
fn read_tokens(path: &PathBuf) -> Result<Vec<HeaderValue>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let tokens: Vec<HeaderValue> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .filter_map(|l| HeaderValue::from_str(&format!("Bearer {}", l.trim())).ok())
        .collect();
    if tokens.is_empty() {
        return Err(format!("{}: no tokens", path.display()));
    }
    Ok(tokens)
}

/// Status counts: `"200": n`, and `"error"` for transport errors.
#[derive(Default)]
struct Outcomes(BTreeMap<String, u64>);

impl Outcomes {
    fn add(&mut self, status: Option<u16>) {
        let key = status.map_or_else(|| "error".to_owned(), |s| s.to_string());
        *self.0.entry(key).or_default() += 1;
    }

    fn merge(&mut self, other: Outcomes) {
        for (k, v) in other.0 {
            *self.0.entry(k).or_default() += v;
        }
    }

    fn ok(&self) -> u64 {
        self.0
            .iter()
            .filter(|(k, _)| k.starts_with('2'))
            .map(|(_, v)| v)
            .sum()
    }

    fn total(&self) -> u64 {
        self.0.values().sum()
    }
}

fn percentile(sorted: &[u64], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

async fn rate(
    target: Arc<Target>,
    tokens: Arc<Vec<HeaderValue>>,
    rate: u64,
    duration: u64,
    warmup: u64,
    connections: usize,
) -> serde_json::Value {
    let rate = rate.max(1);
    let total = rate * (duration + warmup);
    let period = Duration::from_secs_f64(1.0 / rate as f64);
    let (tx, rx) = mpsc::unbounded_channel::<(usize, Instant)>();
    let rx = Arc::new(Mutex::new(rx));
    let start = Instant::now();
    let measure_from = start + Duration::from_secs(warmup);

    let mut workers = Vec::with_capacity(connections);
    for _ in 0..connections {
        let (target, tokens, rx) = (target.clone(), tokens.clone(), rx.clone());
        workers.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut outcomes = Outcomes::default();
            let mut sender = target.connect().await;
            loop {
                let job = rx.lock().await.recv().await;
                let Some((i, queued)) = job else { break };
                if sender.is_none() {
                    sender = target.connect().await;
                }
                let status = match sender.as_mut() {
                    Some(s) => target.send(s, &tokens[i % tokens.len()]).await,
                    None => None,
                };
                if status.is_none() {
                    sender = None;
                }
                if queued >= measure_from {
                    latencies.push(queued.elapsed().as_micros() as u64);
                    outcomes.add(status);
                }
            }
            (latencies, outcomes)
        }));
    }

    // The schedule: request i is due at start + i·period. The timer wakes at millisecond
    // granularity; everything due by then is queued at once, stamped with the time it was
    // queued, so the timer's granularity does not count as server latency but waiting for a
    // busy connection does.
    let mut next = 0u64;
    while next < total {
        let due = start + period.mul_f64(next as f64);
        tokio::time::sleep_until(due.into()).await;
        let now = Instant::now();
        while next < total && start + period.mul_f64(next as f64) <= now {
            if tx.send((next as usize, now)).is_err() {
                break;
            }
            next += 1;
        }
    }
    drop(tx);
    let mut latencies = Vec::new();
    let mut outcomes = Outcomes::default();
    for w in workers {
        if let Ok((l, o)) = w.await {
            latencies.extend(l);
            outcomes.merge(o);
        }
    }
    let elapsed = start.elapsed().as_secs_f64() - warmup as f64;
    latencies.sort_unstable();
    serde_json::json!({
        "rate": rate,
        "sent": outcomes.total(),
        "ok": outcomes.ok(),
        "statuses": outcomes.0,
        "achieved_rps": outcomes.total() as f64 / elapsed.max(1e-9),
        "p50_us": percentile(&latencies, 0.50),
        "p90_us": percentile(&latencies, 0.90),
        "p99_us": percentile(&latencies, 0.99),
        "max_us": latencies.last().copied().unwrap_or(0),
    })
}

async fn once(
    target: Arc<Target>,
    tokens: Arc<Vec<HeaderValue>>,
    concurrency: usize,
) -> serde_json::Value {
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..concurrency.max(1) {
        let (target, tokens, next) = (target.clone(), tokens.clone(), next.clone());
        workers.push(tokio::spawn(async move {
            let mut outcomes = Outcomes::default();
            let mut sender = None;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= tokens.len() {
                    break;
                }
                if sender.is_none() {
                    sender = target.connect().await;
                }
                let status = match sender.as_mut() {
                    Some(s) => target.send(s, &tokens[i]).await,
                    None => None,
                };
                if status.is_none() {
                    sender = None;
                }
                outcomes.add(status);
            }
            outcomes
        }));
    }
    let mut outcomes = Outcomes::default();
    for w in workers {
        if let Ok(o) = w.await {
            outcomes.merge(o);
        }
    }
    let secs = start.elapsed().as_secs_f64();
    serde_json::json!({
        "sent": outcomes.total(),
        "ok": outcomes.ok(),
        "statuses": outcomes.0,
        "seconds": secs,
        "rps": outcomes.total() as f64 / secs.max(1e-9),
    })
}

async fn burst(target: Arc<Target>, token: HeaderValue, n: usize) -> serde_json::Value {
    let mut senders = Vec::with_capacity(n);
    let mut connect_errors = 0u64;
    for _ in 0..n {
        match target.connect().await {
            Some(s) => senders.push(s),
            None => connect_errors += 1,
        }
    }
    let barrier = Arc::new(tokio::sync::Barrier::new(senders.len() + 1));
    let token = Arc::new(token);
    let mut workers = Vec::with_capacity(senders.len());
    for mut sender in senders {
        let (target, barrier, token) = (target.clone(), barrier.clone(), token.clone());
        workers.push(tokio::spawn(async move {
            let _ = sender.ready().await;
            barrier.wait().await;
            target.send(&mut sender, &token).await
        }));
    }
    barrier.wait().await;
    let start = Instant::now();
    let mut outcomes = Outcomes::default();
    for w in workers {
        outcomes.add(w.await.ok().flatten());
    }
    serde_json::json!({
        "connections": n as u64 - connect_errors,
        "connect_errors": connect_errors,
        "ok": outcomes.ok(),
        "statuses": outcomes.0,
        "seconds": start.elapsed().as_secs_f64(),
    })
}

/// One blocking `GET` on a fresh connection: the status code, or `None`.
fn probe(addr: SocketAddr, host: &str, path: &str) -> Option<u16> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = [0u8; 64];
    let mut got = 0;
    while got < 12 {
        match s.read(&mut buf[got..]) {
            Ok(0) | Err(_) => break,
            Ok(k) => got += k,
        }
    }
    std::str::from_utf8(buf.get(9..12)?).ok()?.parse().ok()
}

fn startup(
    ready_url: &Uri,
    runs: usize,
    timeout: u64,
    command: &[String],
) -> Result<serde_json::Value, String> {
    let target = Target::new(ready_url)?;
    let host = target.host.to_str().map_err(|e| e.to_string())?.to_owned();
    let (program, args) = command.split_first().ok_or("no command")?;
    let mut times = Vec::new();
    for _ in 0..runs {
        let start = Instant::now();
        let mut child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("{program}: {e}"))?;
        let deadline = start + Duration::from_secs(timeout);
        let mut ready = None;
        while Instant::now() < deadline {
            if probe(target.addr, &host, &target.path) == Some(200) {
                ready = Some(start.elapsed());
                break;
            }
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!("the command exited early: {status}"));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        let _ = child.kill();
        let _ = child.wait();
        let ready = ready.ok_or("not ready before the timeout")?;
        times.push(ready.as_secs_f64() * 1e3);
        // Let the kernel release the ports before the next start.
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    Ok(serde_json::json!({
        "runs_ms": times,
        "median_ms": sorted[sorted.len() / 2],
    }))
}

fn main() -> Result<(), String> {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let result = match args.command {
        Cmd::Rate {
            url,
            tokens,
            rate: r,
            duration,
            warmup,
            connections,
        } => {
            let target = Arc::new(Target::new(&url)?);
            let tokens = Arc::new(read_tokens(&tokens)?);
            runtime.block_on(rate(
                target,
                tokens,
                r,
                duration,
                warmup,
                connections.max(1),
            ))
        }
        Cmd::Once {
            url,
            tokens,
            concurrency,
        } => {
            let target = Arc::new(Target::new(&url)?);
            let tokens = Arc::new(read_tokens(&tokens)?);
            runtime.block_on(once(target, tokens, concurrency))
        }
        Cmd::Burst { url, tokens, n } => {
            let target = Arc::new(Target::new(&url)?);
            let token = read_tokens(&tokens)?.swap_remove(0);
            runtime.block_on(burst(target, token, n))
        }
        Cmd::Startup {
            ready_url,
            runs,
            timeout,
            command,
        } => startup(&ready_url, runs.max(1), timeout, &command)?,
        Cmd::Soak(soak_args) => {
            let tokens = read_tokens(&soak_args.tokens)?;
            // A thousand streams' events and thousands of requests a second are more than
            // one thread reads in time: the soak gets every core (the other modes measure
            // the proxy against a load generator of known, fixed cost, and keep one).
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            runtime.block_on(soak::run(soak_args, tokens))
        }
    };
    println!("{result}");
    Ok(())
}
