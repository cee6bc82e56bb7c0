//! `bench_load soak`: the load of `benches/soak.sh` (README "Reliability").
//!
//! At once, against the proxy: `--streams` event streams (`GET /sse` of the bench backend),
//! each checked for events in order and for the longest silence between two events; an
//! open-loop `--rate` of tool-call POSTs over the tokens of `--tokens`; and `--churn`
//! connections opened and closed in hostile ways (a whole request, a reset in the middle of
//! a request head, a reset in the middle of a stream, a half-close after the request, a
//! slowloris head). Meanwhile the proxy's resident memory, open file descriptors and gauges
//! are sampled every second. With `--sigterm-after`, the proxy is sent SIGTERM that long after
//! the start (the drain run), and requests are classified by whether they were sent before
//! the listener closed.
//!
//! Every loop is bounded in count and time; everything goes to 127.0.0.1. Prints one JSON
//! object: what was sent and received, and the samples.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderValue, Request, header};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Mutex, mpsc};

/// A tool call, as an MCP client sends it.
const TOOL_CALL: &[u8] =
    br#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"echo","arguments":{"text":"soak"}}}"#;
/// Longest wait for a response or an event before the request counts as stuck.
const STUCK: Duration = Duration::from_secs(30);
/// Longest wait, after the load, for the proxy's connections and tasks to settle.
const SETTLE_LIMIT: Duration = Duration::from_secs(45);
/// Longest wait, after that, for resident memory to stop falling ...
const MEMORY_SETTLE_LIMIT: Duration = Duration::from_secs(45);
/// ... which it has when it has not fallen for this long (the proxy's allocator gives freed
/// pages back over 10 s).
const MEMORY_QUIET: Duration = Duration::from_secs(10);

/// What `soak` is asked to do.
#[derive(Debug, Clone, clap::Args)]
pub struct SoakArgs {
    /// The proxy listener, `127.0.0.1:PORT`.
    #[arg(long)]
    pub proxy: SocketAddr,
    /// The proxy's admin listener (gauges, before and after).
    #[arg(long)]
    pub admin: SocketAddr,
    /// The backend (its `/stats`: streams still open there).
    #[arg(long)]
    pub backend: Option<SocketAddr>,
    /// The proxy's process id (resident memory and file descriptors from /proc).
    #[arg(long)]
    pub pid: u32,
    /// File with one token per line (the POSTs and the streams use them round-robin).
    #[arg(long)]
    pub tokens: PathBuf,
    /// Event streams held open at once.
    #[arg(long, default_value_t = 1000)]
    pub streams: usize,
    /// Events per stream (0: endless, for the drain run).
    #[arg(long, default_value_t = 600)]
    pub events: u64,
    /// Milliseconds between two events at the backend.
    #[arg(long, default_value_t = 100)]
    pub gap_ms: u64,
    /// POSTs per second.
    #[arg(long, default_value_t = 2000)]
    pub rate: u64,
    /// Seconds of POST load.
    #[arg(long, default_value_t = 60)]
    pub duration: u64,
    /// Keep-alive connections for the POSTs.
    #[arg(long, default_value_t = 64)]
    pub connections: usize,
    /// Hostile connections opened and closed during the load.
    #[arg(long, default_value_t = 10_000)]
    pub churn: usize,
    /// Hostile connections in progress at once.
    #[arg(long, default_value_t = 100)]
    pub churn_concurrency: usize,
    /// How long a slowloris connection dribbles its head before giving up, in seconds.
    #[arg(long, default_value_t = 2)]
    pub slowloris_secs: u64,
    /// Slowloris connections that dribble until the proxy closes them (at most 40 s).
    #[arg(long, default_value_t = 0)]
    pub slowloris_until_closed: usize,
    /// Seconds after the start at which the proxy is sent SIGTERM (the drain run).
    #[arg(long)]
    pub sigterm_after: Option<f64>,
    /// The proxy's `shutdown.drain_delay` in seconds: when its listener closes after SIGTERM.
    #[arg(long, default_value_t = 0.0)]
    pub drain_delay: f64,
}

/// Shared counters and samples.
#[derive(Default)]
struct Report {
    post_statuses: StdMutex<BTreeMap<String, u64>>,
    post_latencies: StdMutex<Vec<u64>>,
    /// From the first POST due to the last one answered, in milliseconds.
    posts_ms: AtomicU64,
    /// Transport errors of POSTs sent before the listener closed (or at all, without SIGTERM).
    post_errors_before_close: AtomicU64,
    /// Transport errors of POSTs sent after the listener closed (refused: not failures).
    post_errors_after_close: AtomicU64,
    /// Responses (any status) received, POSTs and streams: each must have one access line.
    responses: AtomicU64,
    streams_opened: AtomicU64,
    streams_complete: AtomicU64,
    streams_failed: AtomicU64,
    streams_out_of_order: AtomicU64,
    streams_refused_after_close: AtomicU64,
    events: AtomicU64,
    max_event_gap_us: AtomicU64,
    stream_end_after_close_ms: AtomicU64,
    churn: StdMutex<BTreeMap<String, u64>>,
    slowloris_closed_after_ms: AtomicU64,
    slowloris_not_closed: AtomicU64,
}

impl Report {
    fn count(map: &StdMutex<BTreeMap<String, u64>>, key: String) {
        if let Ok(mut m) = map.lock() {
            *m.entry(key).or_default() += 1;
        }
    }

    fn churn(&self, kind: &str, outcome: &str) {
        Report::count(&self.churn, format!("{kind}/{outcome}"));
    }
}

/// When the proxy's listener closes after SIGTERM, as an instant (set once SIGTERM is sent).
#[derive(Default)]
struct Clock {
    close_at: StdMutex<Option<Instant>>,
}

impl Clock {
    fn closed_before(&self, t: Instant) -> bool {
        self.close_at
            .lock()
            .ok()
            .and_then(|c| *c)
            .is_some_and(|close| close <= t)
    }

    fn close_at(&self) -> Option<Instant> {
        self.close_at.lock().ok().and_then(|c| *c)
    }
}

/// One `GET` on a fresh connection with `Connection: close`: the body, if the status is 200.
pub async fn fetch(addr: SocketAddr, path: &str) -> Option<String> {
    let mut s = tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(addr))
        .await
        .ok()?
        .ok()?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.ok()?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
        .await
        .ok()?
        .ok()?;
    let text = String::from_utf8_lossy(&buf);
    if !text.starts_with("HTTP/1.1 200") {
        return None;
    }
    let (_, body) = text.split_once("\r\n\r\n")?;
    Some(body.to_owned())
}

/// An unlabelled series of the Prometheus text.
pub fn series(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(name)
            .and_then(|r| r.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
    })
}

/// Resident memory of `pid` in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    status_kib(pid, "VmRSS:")
}

/// A `kB` field of `/proc/PID/status`: `VmRSS:`, or its parts `RssAnon:` (heap, stacks) and
/// `RssFile:` (pages of the binary and libraries, paged in as code paths first run).
fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// CPU time (user + system) of `pid` so far, in seconds.
fn cpu_secs(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which ends with the last ')': state is the first,
    // utime and stime the 12th and 13th.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // USER_HZ is 100 on every Linux architecture this runs on.
    Some(ticks as f64 / 100.0)
}

/// Open file descriptors of `pid`.
fn fds(pid: u32) -> Option<u64> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64)
}

/// The proxy's resources at one moment.
async fn resources(args: &SoakArgs) -> serde_json::Value {
    let metrics = fetch(args.admin, "/metrics").await.unwrap_or_default();
    let backend_open = match args.backend {
        Some(b) => fetch(b, "/stats")
            .await
            .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
            .map(|v| v["streams_open"].clone()),
        None => None,
    };
    serde_json::json!({
        "rss_kib": rss_kib(args.pid),
        "rss_anon_kib": status_kib(args.pid, "RssAnon:"),
        "rss_file_kib": status_kib(args.pid, "RssFile:"),
        "cpu_secs": cpu_secs(args.pid),
        "fds": fds(args.pid),
        "open_connections": series(&metrics, "txp_open_connections"),
        "runtime_tasks": series(&metrics, "txp_runtime_tasks"),
        "backend_streams_open": backend_open,
    })
}

/// A keep-alive HTTP/1.1 connection (no Nagle delay), its driver on its own task; `None` when
/// the connection or the handshake fails.
pub async fn connect<B>(addr: SocketAddr) -> Option<SendRequest<B>>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let stream = TcpStream::connect(addr).await.ok()?;
    let _ = stream.set_nodelay(true);
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .ok()?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Some(sender)
}

/// Open loop: hands request `i` (with the moment it was handed out) to `tx` when it is due, at
/// start + i × `period`, for `total` requests; requests fallen behind go out at once. Returns
/// the start; `tx` is dropped at the end, so the workers finish the queue and stop.
pub async fn pace(
    total: u64,
    period: Duration,
    tx: mpsc::UnboundedSender<(usize, Instant)>,
) -> Instant {
    let start = Instant::now();
    let mut next = 0u64;
    while next < total {
        tokio::time::sleep_until((start + period.mul_f64(next as f64)).into()).await;
        let now = Instant::now();
        while next < total && start + period.mul_f64(next as f64) <= now {
            if tx.send((next as usize, now)).is_err() {
                return start;
            }
            next += 1;
        }
    }
    start
}

/// The open-loop POSTs: request i is due at start + i/rate.
async fn posts(
    args: Arc<SoakArgs>,
    tokens: Arc<Vec<HeaderValue>>,
    report: Arc<Report>,
    clock: Arc<Clock>,
) {
    let rate = args.rate.max(1);
    let total = rate * args.duration;
    let period = Duration::from_secs_f64(1.0 / rate as f64);
    let (tx, rx) = mpsc::unbounded_channel::<(usize, Instant)>();
    let rx = Arc::new(Mutex::new(rx));
    let mut workers = Vec::new();
    for _ in 0..args.connections.max(1) {
        let (args, tokens, report, clock, rx) = (
            args.clone(),
            tokens.clone(),
            report.clone(),
            clock.clone(),
            rx.clone(),
        );
        workers.push(tokio::spawn(async move {
            let mut sender = None;
            loop {
                let job = rx.lock().await.recv().await;
                let Some((i, due)) = job else { break };
                if clock.closed_before(due) {
                    // The listener is closed: no new work goes to this proxy.
                    continue;
                }
                if sender.is_none() {
                    sender = connect(args.proxy).await;
                }
                let status = match sender.as_mut() {
                    Some(s) => post(s, args.proxy, &tokens[i % tokens.len()]).await,
                    None => None,
                };
                match status {
                    Some(code) => {
                        report.responses.fetch_add(1, Ordering::Relaxed);
                        Report::count(&report.post_statuses, code.to_string());
                        if let Ok(mut l) = report.post_latencies.lock() {
                            l.push(due.elapsed().as_micros() as u64);
                        }
                    }
                    None => {
                        sender = None;
                        // Sent on a connection the proxy closed as its listener closed, or
                        // refused: not accepted, so not a failure; before that, a failure.
                        if clock
                            .close_at()
                            .is_some_and(|c| due + Duration::from_millis(50) >= c)
                        {
                            report
                                .post_errors_after_close
                                .fetch_add(1, Ordering::Relaxed);
                        } else {
                            report
                                .post_errors_before_close
                                .fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }
        }));
    }
    let start = pace(total, period, tx).await;
    for w in workers {
        let _ = w.await;
    }
    report
        .posts_ms
        .store(start.elapsed().as_millis() as u64, Ordering::Relaxed);
}

/// One POST of a tool call; the status once the whole body is read.
async fn post(
    sender: &mut SendRequest<Full<Bytes>>,
    addr: SocketAddr,
    authorization: &HeaderValue,
) -> Option<u16> {
    tokio::time::timeout(STUCK, async {
        sender.ready().await.ok()?;
        let req = Request::post("/mcp")
            .header(header::HOST, addr.to_string())
            .header(header::AUTHORIZATION, authorization.clone())
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::ACCEPT, "application/json, text/event-stream")
            .body(Full::new(Bytes::from_static(TOOL_CALL)))
            .ok()?;
        let resp = sender.send_request(req).await.ok()?;
        let status = resp.status().as_u16();
        resp.into_body().collect().await.ok()?;
        Some(status)
    })
    .await
    .ok()
    .flatten()
}

/// One event stream: opened, then read to its end, checking order and silences.
async fn stream(args: Arc<SoakArgs>, token: HeaderValue, report: Arc<Report>, clock: Arc<Clock>) {
    let opened_at = Instant::now();
    let fail = |report: &Report| {
        if clock.closed_before(opened_at) {
            report
                .streams_refused_after_close
                .fetch_add(1, Ordering::Relaxed);
        } else {
            report.streams_failed.fetch_add(1, Ordering::Relaxed);
        }
    };
    let Some(mut sender) = connect(args.proxy).await else {
        return fail(&report);
    };
    let path = format!("/sse?n={}&gap_ms={}", args.events, args.gap_ms);
    let Ok(req) = Request::get(path.as_str())
        .header(header::HOST, args.proxy.to_string())
        .header(header::AUTHORIZATION, token)
        .header(header::ACCEPT, "text/event-stream")
        .body(Full::new(Bytes::new()))
    else {
        return fail(&report);
    };
    let resp = match tokio::time::timeout(STUCK, sender.send_request(req)).await {
        Ok(Ok(r)) => r,
        _ => return fail(&report),
    };
    report.responses.fetch_add(1, Ordering::Relaxed);
    if resp.status() != 200 {
        return fail(&report);
    }
    report.streams_opened.fetch_add(1, Ordering::Relaxed);
    let mut body = resp.into_body();
    let mut pending = Vec::<u8>::new();
    let (mut next_id, mut in_order) = (0u64, true);
    let (mut last_event, mut max_gap) = (None::<Instant>, Duration::ZERO);
    let clean_end = loop {
        let frame = match tokio::time::timeout(STUCK, body.frame()).await {
            Ok(Some(Ok(f))) => f,
            Ok(None) => break true,
            Ok(Some(Err(_))) | Err(_) => break false,
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        pending.extend_from_slice(&data);
        while let Some(end) = pending.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = pending.drain(..end + 2).collect();
            let now = Instant::now();
            if let Some(prev) = last_event {
                max_gap = max_gap.max(now - prev);
            }
            last_event = Some(now);
            let id = std::str::from_utf8(&event)
                .ok()
                .and_then(|e| e.lines().find_map(|l| l.strip_prefix("id: ")))
                .and_then(|v| v.trim().parse::<u64>().ok());
            if id != Some(next_id) {
                in_order = false;
            }
            next_id += 1;
            report.events.fetch_add(1, Ordering::Relaxed);
        }
    };
    report
        .max_event_gap_us
        .fetch_max(max_gap.as_micros() as u64, Ordering::Relaxed);
    if !in_order || !pending.is_empty() {
        report.streams_out_of_order.fetch_add(1, Ordering::Relaxed);
    }
    let expected_all = args.events == 0 || next_id == args.events;
    if clean_end && expected_all {
        report.streams_complete.fetch_add(1, Ordering::Relaxed);
        if let Some(close) = clock.close_at() {
            let after = Instant::now().saturating_duration_since(close);
            report
                .stream_end_after_close_ms
                .fetch_max(after.as_millis() as u64, Ordering::Relaxed);
        }
    } else {
        report.streams_failed.fetch_add(1, Ordering::Relaxed);
    }
}

/// The kinds of hostile connection, in turn.
const CHURN_KINDS: [&str; 5] = [
    "whole_request",
    "reset_mid_head",
    "reset_mid_stream",
    "half_closed",
    "slowloris",
];

/// One hostile connection of kind `i % 5`.
async fn churn_one(i: usize, args: &SoakArgs, token: &HeaderValue, report: &Report) {
    let kind = CHURN_KINDS[i % CHURN_KINDS.len()];
    let Ok(Ok(mut s)) =
        tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(args.proxy)).await
    else {
        return report.churn(kind, "connect_error");
    };
    let auth = token.to_str().unwrap_or("");
    let host = args.proxy;
    let head = |path: &str, extra: &str| {
        format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: {auth}\r\n{extra}\r\n")
    };
    let outcome = async {
        match kind {
            "whole_request" => {
                s.write_all(head("/mcp", "Connection: close\r\n").as_bytes())
                    .await
                    .ok()?;
                let mut buf = Vec::new();
                s.read_to_end(&mut buf).await.ok()?;
                buf.starts_with(b"HTTP/1.1 200").then_some("ok")
            }
            "reset_mid_head" => {
                let h = head("/mcp", "");
                s.write_all(&h.as_bytes()[..h.len() / 2]).await.ok()?;
                tokio::time::sleep(Duration::from_millis(5)).await;
                s.set_zero_linger().ok()?;
                Some("reset")
            }
            "reset_mid_stream" => {
                let path = format!("/sse?n=0&gap_ms={}", args.gap_ms);
                s.write_all(head(&path, "").as_bytes()).await.ok()?;
                let mut buf = [0u8; 512];
                let n = s.read(&mut buf).await.ok()?;
                s.set_zero_linger().ok()?;
                buf[..n].starts_with(b"HTTP/1.1 200").then_some("reset")
            }
            "half_closed" => {
                s.write_all(head("/mcp", "").as_bytes()).await.ok()?;
                s.shutdown().await.ok()?;
                let mut buf = Vec::new();
                let _ = s.read_to_end(&mut buf).await;
                Some(if buf.starts_with(b"HTTP/1.1 200") {
                    "answered"
                } else {
                    "closed"
                })
            }
            _ => {
                let h = head("/mcp", "");
                let until = Instant::now() + Duration::from_secs(args.slowloris_secs);
                for b in h.as_bytes().iter().take(h.len() - 2) {
                    if Instant::now() >= until {
                        break;
                    }
                    s.write_all(std::slice::from_ref(b)).await.ok()?;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Some("gave_up")
            }
        }
    };
    let key = match tokio::time::timeout(STUCK, outcome).await {
        Ok(Some(o)) => o,
        Ok(None) => "io_error",
        Err(_) => "stuck",
    };
    report.churn(kind, key);
}

/// `n` slowloris connections that dribble a header byte every 500 ms until the proxy
/// closes them; records the longest time that took.
async fn slowloris_until_closed(n: usize, addr: SocketAddr, report: Arc<Report>) {
    let mut tasks = Vec::new();
    for _ in 0..n {
        let report = report.clone();
        tasks.push(tokio::spawn(async move {
            let Ok(mut s) = TcpStream::connect(addr).await else {
                return;
            };
            let start = Instant::now();
            let head = format!("GET /mcp HTTP/1.1\r\nHost: {addr}\r\nX-Slow: ");
            let _ = s.write_all(head.as_bytes()).await;
            let limit = Instant::now() + Duration::from_secs(40);
            let mut buf = [0u8; 256];
            while Instant::now() < limit {
                if s.write_all(b"a").await.is_err() {
                    break;
                }
                match tokio::time::timeout(Duration::from_millis(500), s.read(&mut buf)).await {
                    Ok(_) => break, // answered (408) or closed
                    Err(_) => continue,
                }
            }
            if Instant::now() >= limit {
                report.slowloris_not_closed.fetch_add(1, Ordering::Relaxed);
            } else {
                report
                    .slowloris_closed_after_ms
                    .fetch_max(start.elapsed().as_millis() as u64, Ordering::Relaxed);
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
}

async fn churn(args: Arc<SoakArgs>, tokens: Arc<Vec<HeaderValue>>, report: Arc<Report>) {
    let next = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for _ in 0..args.churn_concurrency.max(1) {
        let (args, tokens, report, next) =
            (args.clone(), tokens.clone(), report.clone(), next.clone());
        workers.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                if i >= args.churn {
                    break;
                }
                churn_one(i, &args, &tokens[i % tokens.len()], &report).await;
            }
        }));
    }
    for w in workers {
        let _ = w.await;
    }
}

/// Sends SIGTERM to `pid` (the `kill` command: no unsafe code here).
fn sigterm(pid: u32) -> bool {
    std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .is_ok_and(|s| s.success())
}

fn percentile(sorted: &[u64], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// Runs the soak (or the drain run) and returns its report.
pub async fn run(args: SoakArgs, tokens: Vec<HeaderValue>) -> serde_json::Value {
    let args = Arc::new(args);
    let tokens = Arc::new(tokens);
    let report = Arc::new(Report::default());
    let clock = Arc::new(Clock::default());
    let before = resources(&args).await;
    let start = Instant::now();

    // Samples every second until the load is over.
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (args, done) = (args.clone(), done.clone());
        tokio::spawn(async move {
            let mut samples = Vec::new();
            let limit = 3600;
            for _ in 0..limit {
                if done.load(Ordering::Relaxed) {
                    break;
                }
                let r = resources(&args).await;
                samples.push(serde_json::json!({
                    "t": start.elapsed().as_secs_f64(),
                    "rss_kib": r["rss_kib"],
                    "rss_anon_kib": r["rss_anon_kib"],
                    "fds": r["fds"],
                    "open_connections": r["open_connections"],
                }));
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            samples
        })
    };

    let mut load = Vec::new();
    for i in 0..args.streams {
        let (args, report, clock) = (args.clone(), report.clone(), clock.clone());
        let token = tokens[i % tokens.len()].clone();
        load.push(tokio::spawn(stream(args, token, report, clock)));
        // Open them over about a second, not in one burst.
        if i % 50 == 49 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    load.push(tokio::spawn(posts(
        args.clone(),
        tokens.clone(),
        report.clone(),
        clock.clone(),
    )));
    load.push(tokio::spawn(churn(
        args.clone(),
        tokens.clone(),
        report.clone(),
    )));
    if args.slowloris_until_closed > 0 {
        load.push(tokio::spawn(slowloris_until_closed(
            args.slowloris_until_closed,
            args.proxy,
            report.clone(),
        )));
    }
    let mut sigterm_sent = None;
    if let Some(after) = args.sigterm_after {
        tokio::time::sleep_until((start + Duration::from_secs_f64(after)).into()).await;
        let at = Instant::now();
        if let Ok(mut c) = clock.close_at.lock() {
            *c = Some(at + Duration::from_secs_f64(args.drain_delay));
        }
        sigterm_sent = Some(sigterm(args.pid));
    }
    let load_limit = Duration::from_secs(args.duration + args.events * args.gap_ms / 1000 + 120);
    for task in load {
        let left = load_limit.saturating_sub(start.elapsed());
        let _ = tokio::time::timeout(left, task).await;
    }
    let load_secs = start.elapsed().as_secs_f64();

    // After the load: until the proxy's connections are back to where they were (or it
    // exited, in the drain run), sampling on.
    let settle_start = Instant::now();
    let mut after = resources(&args).await;
    if args.sigterm_after.is_none() {
        while settle_start.elapsed() < SETTLE_LIMIT
            && (after["open_connections"] != before["open_connections"]
                || after["backend_streams_open"] != before["backend_streams_open"])
        {
            tokio::time::sleep(Duration::from_millis(250)).await;
            after = resources(&args).await;
        }
        // The pool's idle connections to the backend close after `pool_idle_timeout`.
        tokio::time::sleep(Duration::from_secs(2)).await;
        after = resources(&args).await;
    }
    let settle_secs = settle_start.elapsed().as_secs_f64();
    // Then until resident memory stops falling: the allocator gives freed pages back on its
    // own clock (README "Reliability"), not the moment the connections close.
    let memory_start = Instant::now();
    if args.sigterm_after.is_none() {
        let mut lowest = after["rss_kib"].as_u64();
        let mut lowest_at = Instant::now();
        while memory_start.elapsed() < MEMORY_SETTLE_LIMIT && lowest_at.elapsed() < MEMORY_QUIET {
            tokio::time::sleep(Duration::from_secs(1)).await;
            after = resources(&args).await;
            if let Some(rss) = after["rss_kib"].as_u64()
                && lowest.is_none_or(|l| rss < l)
            {
                (lowest, lowest_at) = (Some(rss), Instant::now());
            }
        }
    }
    let memory_settle_secs = memory_start.elapsed().as_secs_f64();
    done.store(true, Ordering::Relaxed);
    let samples = sampler.await.unwrap_or_default();

    let mut latencies = report
        .post_latencies
        .lock()
        .map(|l| l.clone())
        .unwrap_or_default();
    latencies.sort_unstable();
    let statuses = report
        .post_statuses
        .lock()
        .map(|m| m.clone())
        .unwrap_or_default();
    let churn = report.churn.lock().map(|m| m.clone()).unwrap_or_default();
    let r = &report;
    let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
    serde_json::json!({
        "settings": {
            "streams": args.streams, "events": args.events, "gap_ms": args.gap_ms,
            "rate": args.rate, "duration": args.duration, "churn": args.churn,
            "tokens": tokens.len(),
        },
        "load_secs": load_secs,
        "settle_secs": settle_secs,
        "memory_settle_secs": memory_settle_secs,
        "posts": {
            "responses": statuses.values().sum::<u64>(),
            "statuses": statuses,
            "errors_before_close": get(&r.post_errors_before_close),
            "refused_after_close": get(&r.post_errors_after_close),
            "secs": get(&r.posts_ms) as f64 / 1000.0,
            "p50_us": percentile(&latencies, 0.5),
            "p99_us": percentile(&latencies, 0.99),
            "max_us": latencies.last().copied().unwrap_or(0),
        },
        "streams": {
            "opened": get(&r.streams_opened),
            "complete": get(&r.streams_complete),
            "failed": get(&r.streams_failed),
            "out_of_order": get(&r.streams_out_of_order),
            "refused_after_close": get(&r.streams_refused_after_close),
            "events": get(&r.events),
            "max_gap_ms": get(&r.max_event_gap_us) as f64 / 1000.0,
            "end_after_close_ms": get(&r.stream_end_after_close_ms),
        },
        "responses": get(&r.responses),
        "churn": churn,
        "slowloris_until_closed": {
            "n": args.slowloris_until_closed,
            "closed_after_ms_max": get(&r.slowloris_closed_after_ms),
            "not_closed": get(&r.slowloris_not_closed),
        },
        "sigterm_sent": sigterm_sent,
        "before": before,
        "after": after,
        "samples": samples,
    })
}
