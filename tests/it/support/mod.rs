//! In-process peers for the integration tests: an echo backend, the proxy started from YAML on
//! port 0 (in-process, or as the real binary), and small HTTP helpers. Loopback only.

#![allow(dead_code)]

pub mod certs;
pub mod entra;
pub mod issuer;
pub mod keepalive;
pub mod otlp;
pub mod token_endpoint;

use std::collections::HashMap;
use std::convert::Infallible;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

use token_exchange_proxy::config;
use token_exchange_proxy::server::{self, Running};

/// One request as the backend saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: http::Method,
    pub uri: http::Uri,
    pub headers: HeaderMap,
}

/// The echo backend.
#[derive(Clone)]
pub struct Echo {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    pub count: Arc<AtomicUsize>,
}

impl Echo {
    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Requests received so far.
    pub fn requests(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }

    /// The last request received.
    pub fn last(&self) -> Option<Seen> {
        self.seen.lock().expect("lock").last().cloned()
    }
}

fn query(uri: &http::Uri) -> HashMap<String, String> {
    uri.query()
        .map(|q| {
            q.split('&')
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        })
        .unwrap_or_default()
}

type BoxBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

fn full(s: impl Into<Bytes>) -> BoxBody {
    Full::new(s.into()).boxed()
}

/// Starts the echo backend on 127.0.0.1:0. Routes:
/// - `/sse?n=5&gap_ms=200`: `n` SSE events, one every `gap_ms`, each carrying its send time.
/// - `/delay?ms=2000`: answers 200 after `ms`.
/// - `/upload`: reads the whole body chunk by chunk and answers with its length.
/// - `/stall`: never answers.
/// - `/challenge`: 401 with a `WWW-Authenticate` naming the backend's own address.
/// - anything else: 200 with a JSON echo of method, path and headers.
pub async fn echo() -> Echo {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind echo");
    let addr = listener.local_addr().expect("addr");
    let echo = Echo {
        addr,
        seen: Arc::default(),
        count: Arc::default(),
    };
    let e = echo.clone();
    serve(listener, move |req| route(e.clone(), req));
    echo
}

/// Serves `handler` on `listener` (HTTP/1.1 and h2c) for the rest of the test.
pub fn serve<H, Fut, B>(listener: TcpListener, handler: H)
where
    H: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Response<B>> + Send + 'static,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let handler = handler.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let response = handler(req);
                    async move { Ok::<_, Infallible>(response.await) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
}

async fn route(e: Echo, req: Request<Incoming>) -> Response<BoxBody> {
    // The validator's own discovery and JWKS fetches (the echo doubles as a key-less issuer)
    // are not requests forwarded by the proxy: they are neither counted nor recorded.
    let idp_fetch = matches!(
        req.uri().path(),
        "/.well-known/openid-configuration" | "/jwks"
    );
    if !idp_fetch {
        e.count.fetch_add(1, Ordering::SeqCst);
        e.seen.lock().expect("lock").push(Seen {
            method: req.method().clone(),
            uri: req.uri().clone(),
            headers: req.headers().clone(),
        });
    }
    let q = query(req.uri());
    let num = |k: &str, d: u64| q.get(k).and_then(|v| v.parse().ok()).unwrap_or(d);
    match req.uri().path() {
        "/sse" => {
            let (n, gap) = (num("n", 5), Duration::from_millis(num("gap_ms", 200)));
            let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(4);
            tokio::spawn(async move {
                for i in 0..n {
                    tokio::time::sleep(gap).await;
                    let ev = format!("id: {i}\nevent: tick\ndata: {i} {}\n\n", unix_micros());
                    if tx.send(Ok(Frame::data(Bytes::from(ev)))).await.is_err() {
                        return;
                    }
                }
            });
            let body = StreamBody::new(tokio_stream_from(rx));
            Response::builder()
                .header("content-type", "text/event-stream")
                .header("cache-control", "no-cache")
                .header("mcp-session-id", "session-from-backend")
                .body(BodyExt::boxed(body))
                .expect("response")
        }
        "/.well-known/openid-configuration" => {
            let doc =
                serde_json::json!({ "issuer": e.url(), "jwks_uri": format!("{}/jwks", e.url()) });
            Response::new(full(doc.to_string()))
        }
        "/jwks" => Response::new(full(r#"{"keys":[]}"#)),
        "/delay" => {
            tokio::time::sleep(Duration::from_millis(num("ms", 2000))).await;
            Response::new(full("done"))
        }
        "/challenge" => Response::builder()
            .status(401)
            .header(
                "www-authenticate",
                format!(
                    "Bearer realm=\"http://{}/internal\", error=\"invalid_token\"",
                    e.addr
                ),
            )
            .body(full("{}"))
            .expect("response"),
        "/stall" => {
            std::future::pending::<()>().await;
            unreachable!()
        }
        "/upload" => {
            let mut body = req.into_body();
            let mut total: u64 = 0;
            while let Some(frame) = body.frame().await {
                match frame {
                    Ok(f) => total += f.data_ref().map_or(0, |d| d.len() as u64),
                    Err(_) => {
                        return Response::builder()
                            .status(400)
                            .body(full("broken"))
                            .expect("response");
                    }
                }
            }
            Response::new(full(total.to_string()))
        }
        _ => {
            let headers: Vec<(String, String)> = req
                .headers()
                .iter()
                .map(|(k, v)| {
                    (
                        k.to_string(),
                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                    )
                })
                .collect();
            let doc = serde_json::json!({
                "method": req.method().as_str(),
                "path": req.uri().path(),
                "query": req.uri().query(),
                "headers": headers,
            });
            Response::builder()
                .header("content-type", "application/json")
                .header("mcp-session-id", "session-from-backend")
                .header("connection", "x-backend-private")
                .header("x-backend-private", "hop")
                .body(full(doc.to_string()))
                .expect("response")
        }
    }
}

/// Microseconds since the Unix epoch (comparable across the tasks of one test).
pub fn unix_micros() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros())
        .unwrap_or(0)
}

/// Adapts an mpsc receiver to a `Stream` without pulling in tokio-stream.
fn tokio_stream_from<T: Send + 'static>(
    rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> + Send + 'static {
    futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|v| (v, rx)) })
}

/// Replaces `listen`/`admin_listen` with 127.0.0.1:0 and loads `yaml` as the config.
pub fn config_from(yaml: &str) -> config::Config {
    let text = format!(
        "listen: 127.0.0.1:0\nadmin_listen: 127.0.0.1:0\nlog: {{format: text, level: warn}}\n{yaml}"
    );
    let raw = config::parse_yaml(&text).expect("yaml parses");
    config::validate(raw).expect("config is valid")
}

/// Starts the proxy in-process from `yaml` (listeners on port 0).
pub async fn proxy(yaml: &str) -> Running {
    server::start(config_from(yaml))
        .await
        .expect("proxy starts")
}

/// A plain HTTP/1.1 client without pooling surprises.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client")
}

/// Polls `check` every 20 ms until it is true or `limit` passes.
pub async fn eventually(limit: Duration, mut check: impl AsyncFnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

/// The value of a metric line (exact name with labels) from the admin listener.
pub async fn metric(admin: SocketAddr, series: &str) -> Option<f64> {
    let text = client()
        .get(format!("http://{admin}/metrics"))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
        })
        .and_then(|v| v.trim().parse().ok())
}

/// The proxy binary running as a child process.
pub struct ProxyProcess {
    pub child: Child,
    pub addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub logs: Arc<Mutex<Vec<String>>>,
    _dir: tempfile::TempDir,
}

impl ProxyProcess {
    /// Writes `yaml` (plus port-0 listeners and JSON logs) to a file and runs the binary on it.
    pub fn spawn(yaml: &str) -> Self {
        Self::spawn_logging("info", yaml)
    }

    /// [`ProxyProcess::spawn`] with `log.level` = `level`.
    pub fn spawn_logging(level: &str, yaml: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("config.yaml");
        std::fs::write(
            &path,
            format!("listen: 127.0.0.1:0\nadmin_listen: 127.0.0.1:0\nlog: {{format: json, level: '{level}'}}\n{yaml}"),
        )
        .expect("write config");
        let mut child = Command::new(env!("CARGO_BIN_EXE_token-exchange-proxy"))
            .arg("--config")
            .arg(&path)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn proxy");
        let stdout = child.stdout.take().expect("stdout");
        let logs: Arc<Mutex<Vec<String>>> = Arc::default();
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = logs.clone();
        std::thread::spawn(move || {
            let mut sent = false;
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if !sent
                    && let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
                    && let (Some(l), Some(a)) = (v["listen"].as_str(), v["admin"].as_str())
                {
                    let _ = tx.send((l.to_string(), a.to_string()));
                    sent = true;
                }
                sink.lock().expect("lock").push(line);
            }
        });
        let (listen, admin) = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("proxy reports its addresses");
        Self {
            child,
            addr: listen.parse().expect("addr"),
            admin_addr: admin.parse().expect("addr"),
            logs,
            _dir: dir,
        }
    }

    /// Resident memory of the process in KiB (Linux).
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
    }

    /// Waits up to `limit` for the process to exit; returns its exit code.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Status plus body of a simple GET through `client()`.
pub async fn get(url: &str) -> (StatusCode, HeaderMap, String) {
    answer(client().get(url)).await
}

/// [`get`] with `Authorization: Bearer <token>`.
pub async fn get_bearer(url: &str, token: &str) -> (StatusCode, HeaderMap, String) {
    answer(client().get(url).bearer_auth(token)).await
}

async fn answer(req: reqwest::RequestBuilder) -> (StatusCode, HeaderMap, String) {
    let resp = req.send().await.expect("request");
    let status = resp.status();
    let headers = resp.headers().clone();
    (status, headers, resp.text().await.expect("body"))
}

/// A form-encoded request (RFC 6749 §4.1.3 and after) as a token endpoint reads it.
pub struct FormRequest {
    /// The `Authorization` header, if any.
    pub authorization: Option<String>,
    /// The W3C `traceparent` header, if any.
    pub traceparent: Option<String>,
    /// Whether `Content-Type` is `application/x-www-form-urlencoded`.
    pub form_content: bool,
    /// The form's pairs, decoded, in order.
    pub form: Vec<(String, String)>,
}

/// Reads `req` whole as a [`FormRequest`].
pub async fn read_form(req: Request<Incoming>) -> FormRequest {
    let authorization = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let traceparent = req
        .headers()
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let form_content = req
        .headers()
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v == "application/x-www-form-urlencoded");
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let form = url::form_urlencoded::parse(&body).into_owned().collect();
    FormRequest {
        authorization,
        traceparent,
        form_content,
        form,
    }
}

/// Waits up to 15 s for `/readyz` on `admin` to answer 200.
pub async fn wait_ready(admin: SocketAddr) {
    let ready = eventually(Duration::from_secs(15), async || {
        client()
            .get(format!("http://{admin}/readyz"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await;
    assert!(ready, "proxy never became ready");
}

/// An in-process issuer (JWKS on loopback) with one published key, and a valid token of it
/// (`aud` = `mcp`).
pub struct Trust {
    pub issuer: issuer::Issuer,
    pub key: issuer::Key,
    pub token: String,
}

impl Trust {
    /// Starts the issuer and signs the token.
    pub async fn start() -> Self {
        let issuer = issuer::Issuer::start().await;
        let key = issuer::Key::ec("ec-1");
        issuer.publish(&[&key]);
        let token = key.sign(&key.header(), &issuer.claims("mcp", ""));
        Self { issuer, key, token }
    }

    /// The `inbound:` line trusting this issuer, with `extra` keys inside `{…}`.
    pub fn inbound(&self, extra: &str) -> String {
        format!(
            "inbound: {{issuer: '{}', jwks_uri: '{}', audiences: [mcp]{extra}}}\n",
            self.issuer.url(),
            self.issuer.jwks_uri(),
        )
    }

    /// A passthrough config in front of `upstream_url`: `upstream` extra keys go inside
    /// `upstream: {…}`, `inbound` extra keys inside `inbound: {…}`, `top` is appended.
    pub fn passthrough(
        &self,
        upstream_url: &str,
        upstream: &str,
        inbound: &str,
        top: &str,
    ) -> String {
        format!(
            "mode: passthrough\nupstream: {{url: '{upstream_url}'{upstream}}}\n{}{top}",
            self.inbound(inbound)
        )
    }

    /// Another token of the issuer's, with `claims` changed by `change`.
    pub fn token_with(&self, change: impl FnOnce(&mut serde_json::Value)) -> String {
        let mut claims = self.issuer.claims("mcp", "");
        change(&mut claims);
        self.key.sign(&self.key.header(), &claims)
    }

    /// `Bearer <token>`.
    pub fn bearer(&self) -> String {
        format!("Bearer {}", self.token)
    }
}

/// A passthrough proxy in front of `upstream` whose tokens come from an in-process issuer
/// (JWKS on loopback), ready to serve; the issuer, key and token are its [`Trust`]'s.
pub struct Signed {
    pub proxy: Running,
    pub trust: Trust,
}

impl std::ops::Deref for Signed {
    type Target = Trust;

    fn deref(&self) -> &Trust {
        &self.trust
    }
}

impl Signed {
    /// `http://PROXY` + `path`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.proxy.addr)
    }
}

/// Starts [`Signed`]: `upstream` extra keys go inside `upstream: {…}`, `inbound` extra keys
/// inside `inbound: {…}`, and `top` is appended at the top level.
pub async fn signed(upstream_url: &str, upstream: &str, inbound: &str, top: &str) -> Signed {
    let trust = Trust::start().await;
    let proxy = proxy(&trust.passthrough(upstream_url, upstream, inbound, top)).await;
    wait_ready(proxy.admin_addr).await;
    Signed { proxy, trust }
}
