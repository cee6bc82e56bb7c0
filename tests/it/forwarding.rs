//! Forwarding: headers, bodies, streaming, upstream failures (README "HTTP behaviour").

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::token_endpoint::{Answer, ClientAuth, TokenEndpoint};
use crate::support::{self, client, echo, metric, proxy, signed, unix_micros};

/// Reads SSE events from `resp`, returning (event index, send time µs, arrival time µs).
async fn read_events(mut resp: reqwest::Response, expect: usize) -> Vec<(usize, u128, u128)> {
    let mut buf = String::new();
    let mut events = Vec::new();
    while events.len() < expect {
        let Some(chunk) = resp.chunk().await.expect("chunk") else {
            break;
        };
        let now = unix_micros();
        buf.push_str(std::str::from_utf8(&chunk).expect("utf8"));
        while let Some(end) = buf.find("\n\n") {
            let event: String = buf.drain(..end + 2).collect();
            let data = event
                .lines()
                .find_map(|l| l.strip_prefix("data: "))
                .expect("data line");
            let (i, sent) = data.split_once(' ').expect("index and time");
            events.push((i.parse().expect("index"), sent.parse().expect("time"), now));
        }
    }
    events
}

#[tokio::test]
async fn sse_events_arrive_as_the_backend_writes_them() {
    let backend = echo().await;
    let p = signed(&backend.url(), "", "", "").await;
    let resp = client()
        .get(p.url("/sse?n=5&gap_ms=200"))
        .bearer_auth(&p.token)
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let events = read_events(resp, 5).await;
    assert_eq!(events.len(), 5);
    for (i, sent, arrived) in &events {
        let lag_ms = (arrived.saturating_sub(*sent)) as f64 / 1000.0;
        assert!(
            lag_ms < 50.0,
            "event {i} arrived {lag_ms} ms after it was written"
        );
    }
    // Not all at the end: the first event arrived long before the last was written.
    assert!(
        events[4].1 - events[0].2 > 600_000,
        "events were buffered: {events:?}"
    );
}

#[tokio::test]
async fn sse_stream_outlives_the_response_header_timeout() {
    let backend = echo().await;
    let p = signed(&backend.url(), ", response_header_timeout: 300ms", "", "").await;
    let started = Instant::now();
    let resp = client()
        .get(p.url("/sse?n=5&gap_ms=250"))
        .bearer_auth(&p.token)
        .send()
        .await
        .expect("request");
    let events = read_events(resp, 5).await;
    assert_eq!(events.len(), 5, "stream was cut");
    assert!(started.elapsed() > Duration::from_millis(1000));
}

#[tokio::test]
async fn response_header_timeout_answers_504() {
    let backend = echo().await;
    let p = signed(&backend.url(), ", response_header_timeout: 200ms", "", "").await;
    let (status, headers, body) = support::get_bearer(&p.url("/stall"), &p.token).await;
    assert_eq!(status, 504);
    assert_eq!(headers["content-type"], "application/json");
    assert!(body.contains("gateway_timeout"), "{body}");
    assert_eq!(
        metric(
            p.proxy.admin_addr,
            "txp_upstream_errors_total{kind=\"timeout\"}"
        )
        .await,
        Some(1.0)
    );
}

#[tokio::test]
async fn refused_backend_answers_502() {
    // A port that was just free: nothing listens there.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr");
    let p = signed(&format!("http://{closed}"), "", "", "").await;
    let (status, _, body) = support::get_bearer(&p.url("/x"), &p.token).await;
    assert_eq!(status, 502);
    assert!(body.contains("backend unreachable"), "{body}");
    assert_eq!(
        metric(
            p.proxy.admin_addr,
            "txp_upstream_errors_total{kind=\"connect\"}"
        )
        .await,
        Some(1.0)
    );
}

#[tokio::test]
async fn connect_timeout_answers_502() {
    // A listener whose accept queue is full never completes another handshake: connecting
    // to it hangs until the proxy's connect timeout.
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind("127.0.0.1:0".parse().expect("addr"))
        .expect("bind");
    let addr = socket.local_addr().expect("addr");
    let _listener = socket.listen(0).expect("listen");
    let mut fillers = Vec::new();
    for _ in 0..4 {
        if let Ok(Ok(s)) = tokio::time::timeout(
            Duration::from_millis(200),
            tokio::net::TcpStream::connect(addr),
        )
        .await
        {
            fillers.push(s);
        }
    }
    let p = signed(
        &format!("http://{addr}"),
        ", connect_timeout: 300ms",
        "",
        "",
    )
    .await;
    let started = Instant::now();
    let (status, _, _) = support::get_bearer(&p.url("/x"), &p.token).await;
    assert_eq!(status, 502);
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "did not wait for the connect timeout"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn every_connection_named_header_is_removed_both_ways() {
    let backend = echo().await;
    let p = signed(&backend.url(), "", "", "").await;
    let mut s = tokio::net::TcpStream::connect(p.proxy.addr)
        .await
        .expect("connect");
    s.write_all(
        format!(
            "GET /echo HTTP/1.1\r\nHost: client.example\r\nAuthorization: Bearer {}\r\nConnection: x-a\r\nConnection: x-b\r\nx-a: 1\r\nx-b: 2\r\nx-c: 3\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\n\r\n",
            p.token
        )
        .as_bytes(),
    )
    .await
    .expect("write");
    let mut buf = vec![0u8; 16384];
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("read")
            .expect("read");
        got.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&got);
        if n == 0 || (text.contains("\r\n\r\n") && text.trim_end().ends_with('}')) {
            break;
        }
    }
    let text = String::from_utf8_lossy(&got).to_ascii_lowercase();
    let seen = backend.last().expect("backend got the request");
    for name in ["x-a", "x-b", "connection", "keep-alive", "te"] {
        assert!(
            seen.headers.get(name).is_none(),
            "{name} reached the backend"
        );
    }
    assert_eq!(seen.headers["x-c"], "3");
    assert!(text.starts_with("http/1.1 200"), "{text}");
    assert!(
        !text.contains("x-backend-private"),
        "backend's hop-by-hop header reached the client: {text}"
    );
    assert!(text.contains("mcp-session-id: session-from-backend"));
}

#[tokio::test]
async fn request_is_forwarded_unchanged_with_forwarding_headers() {
    let backend = echo().await;
    let p = signed(&backend.url(), "", "", "").await;
    let resp = client()
        .post(p.url("/mcp/call?x=1&y=two"))
        .bearer_auth(&p.token)
        .header("host", "mcp.example.com")
        .header("mcp-session-id", "s-1")
        .header("last-event-id", "41")
        .header("mcp-protocol-version", "2025-11-25")
        .header("x-forwarded-for", "192.0.2.1")
        .header("cookie", "a=b")
        .body("payload")
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["mcp-session-id"], "session-from-backend");
    let seen = backend.last().expect("forwarded");
    assert_eq!(seen.method, "POST");
    assert_eq!(seen.uri.path(), "/mcp/call");
    assert_eq!(seen.uri.query(), Some("x=1&y=two"));
    let h = &seen.headers;
    assert_eq!(h["host"], backend.addr.to_string());
    assert_eq!(h["x-forwarded-host"], "mcp.example.com");
    assert_eq!(h["x-forwarded-proto"], "http");
    // The client is no trusted proxy: its X-Forwarded-For is replaced by its own address.
    assert_eq!(h["x-forwarded-for"], "127.0.0.1");
    assert_eq!(h["mcp-session-id"], "s-1");
    assert_eq!(h["last-event-id"], "41");
    assert_eq!(h["mcp-protocol-version"], "2025-11-25");
    assert_eq!(h["content-length"], "7");
}

#[tokio::test]
async fn preserve_host_forwards_the_client_host() {
    let backend = echo().await;
    let p = signed(&backend.url(), ", preserve_host: true", "", "").await;
    client()
        .get(p.url("/x"))
        .bearer_auth(&p.token)
        .header("host", "public.example")
        .send()
        .await
        .expect("request");
    assert_eq!(
        backend.last().expect("forwarded").headers["host"],
        "public.example"
    );
}

#[tokio::test]
async fn h2c_clients_are_served() {
    let backend = echo().await;
    let p = signed(&backend.url(), "", "", "").await;
    let h2 = reqwest::Client::builder()
        .no_proxy()
        .http2_prior_knowledge()
        .build()
        .expect("client");
    let resp = h2
        .get(p.url("/sse?n=2&gap_ms=50"))
        .bearer_auth(&p.token)
        .send()
        .await
        .expect("h2 request");
    assert_eq!(resp.version(), reqwest::Version::HTTP_2);
    let body = resp.text().await.expect("body");
    assert_eq!(body.matches("event: tick").count(), 2);
    assert_eq!(
        backend.last().expect("forwarded").headers["host"],
        backend.addr.to_string()
    );
}

#[tokio::test]
async fn without_a_token_nothing_is_forwarded() {
    let backend = echo().await;
    let url = backend.url();
    let cfg = format!(
        "mode: passthrough\nupstream: {{url: '{url}'}}\npublic_url: https://mcp.example.com\ninbound: {{issuer: '{url}', audiences: [test], public_paths: [/health]}}\n"
    );
    let p = proxy(&cfg).await;
    let meta = "https://mcp.example.com/.well-known/oauth-protected-resource";
    for (path, suffix) in [("/mcp", "/mcp"), ("/healthz", "/healthz"), ("/", "")] {
        let (status, headers, body) = support::get(&format!("http://{}{path}", p.addr)).await;
        assert_eq!(status, 401, "{path}");
        assert_eq!(
            headers["www-authenticate"].to_str().expect("ascii"),
            format!("Bearer resource_metadata=\"{meta}{suffix}\""),
            "{path}"
        );
        assert!(body.contains("\"error\""), "{body}");
    }
    // Dot segments, encoded dots or slashes and path parameters (`..;`, which servlet
    // containers resolve as `..`) never make a path public (a client library would normalise
    // some of them away, so send them raw).
    let raws = [
        "/health/../mcp",
        "/health/%2e%2e/mcp",
        "/health%2fmcp",
        "/health/..;/mcp",
        "/health/..;x=1/mcp",
        "/health;/../mcp",
    ];
    for raw in raws {
        let mut s = tokio::net::TcpStream::connect(p.addr)
            .await
            .expect("connect");
        s.write_all(
            format!("GET {raw} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .expect("write");
        let mut out = String::new();
        s.read_to_string(&mut out).await.expect("read");
        assert!(out.starts_with("HTTP/1.1 401"), "{raw}: {out}");
    }
    assert_eq!(
        backend.requests(),
        0,
        "an unauthenticated request reached the backend"
    );
    let (status, _, _) = support::get(&format!("http://{}/health/live", p.addr)).await;
    assert_eq!(status, 200);
    assert_eq!(backend.requests(), 1);
    let (status, _, body) = support::get(&format!(
        "http://{}/.well-known/oauth-protected-resource/mcp",
        p.addr
    ))
    .await;
    assert_eq!(status, 200);
    let doc: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(doc["resource"], "https://mcp.example.com/mcp");
    assert_eq!(doc["authorization_servers"][0], url);
    assert_eq!(
        metric(
            p.admin_addr,
            "txp_token_rejections_total{reason=\"missing\"}"
        )
        .await,
        Some(3.0 + raws.len() as f64)
    );
    assert_eq!(
        metric(p.admin_addr, "txp_requests_total{status=\"401\"}").await,
        Some(3.0 + raws.len() as f64)
    );
}

/// The binary's allocator gives freed pages back on a thread of its own, so that an idle
/// proxy does not keep the memory of its last peak (README "Reliability").
#[cfg(feature = "jemalloc")]
#[tokio::test]
async fn the_binary_runs_the_allocators_background_thread() {
    let backend = echo().await;
    let trust = support::Trust::start().await;
    let proc = support::ProxyProcess::spawn(&trust.passthrough(&backend.url(), "", "", ""));
    support::wait_ready(proc.admin_addr).await;
    let tasks = std::fs::read_dir(format!("/proc/{}/task", proc.child.id())).expect("tasks");
    let names: Vec<String> = tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|n| n.trim().to_string())
        .collect();
    assert!(
        names.iter().any(|n| n == "jemalloc_bg_thd"),
        "threads: {names:?}"
    );
}

#[tokio::test]
async fn large_request_body_streams_with_bounded_proxy_memory() {
    const TOTAL: u64 = 256 * 1024 * 1024;
    const CHUNK: usize = 64 * 1024;
    let backend = echo().await;
    let trust = support::Trust::start().await;
    let proc = support::ProxyProcess::spawn(&trust.passthrough(&backend.url(), "", "", ""));
    support::wait_ready(proc.admin_addr).await;
    let baseline = proc.rss_kib();
    let peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(baseline));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let (peak, stop, pid) = (peak.clone(), stop.clone(), proc.child.id());
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let status =
                    std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
                if let Some(kib) = status
                    .lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                {
                    peak.fetch_max(kib, std::sync::atomic::Ordering::SeqCst);
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    };
    let chunk = Bytes::from(vec![b'x'; CHUNK]);
    let chunks = (TOTAL / CHUNK as u64) as usize;
    let stream = futures_util::stream::iter(
        std::iter::repeat_n(chunk, chunks)
            .map(|c| Ok::<_, std::convert::Infallible>(Frame::data(c))),
    );
    let body = StreamBody::new(stream);
    let h1 = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<StreamBody<_>>();
    let req = http::Request::post(format!("http://{}/upload", proc.addr))
        .header("content-length", TOTAL.to_string())
        .header("authorization", trust.bearer())
        .body(body)
        .expect("request");
    let resp = h1.request(req).await.expect("upload");
    assert_eq!(resp.status(), 200);
    let got = resp.into_body().collect().await.expect("body").to_bytes();
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    sampler.join().expect("sampler");
    assert_eq!(
        String::from_utf8_lossy(&got),
        TOTAL.to_string(),
        "backend received every byte"
    );
    let growth_mib = (peak
        .load(std::sync::atomic::Ordering::SeqCst)
        .saturating_sub(baseline)) as f64
        / 1024.0;
    println!(
        "proxy RSS baseline {} KiB, growth {growth_mib:.1} MiB while streaming 256 MiB",
        baseline
    );
    assert!(growth_mib < 32.0, "proxy RSS grew by {growth_mib:.1} MiB");
}

/// The proxy binary in exchange mode at `log.level: debug`, the IdP refusing, failing and
/// exchanging in turn: no log line holds a client token, the exchanged token, the client
/// secret, a cookie or a query string.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_never_contain_credentials_or_query_strings() {
    const CLIENT_SECRET: &str = "client-secret-value-7c1";
    const EXCHANGED: &str = "exchanged-token-value-4e8";
    let backend = echo().await;
    let trust = support::Trust::start().await;
    let idp = TokenEndpoint::start(ClientAuth::Post {
        id: "txp".into(),
        secret: CLIENT_SECRET.into(),
    })
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let secret_file = dir.path().join("secret");
    std::fs::write(&secret_file, CLIENT_SECRET).expect("write");
    let proc = support::ProxyProcess::spawn_logging(
        "debug",
        &format!(
            "upstream: {{url: '{}'}}\n{}exchange: {{token_endpoint: '{}', client_id: txp, client_auth: {{method: client_secret_post, secret_file: '{}'}}, audience: [backend], timeout: 2s}}\n",
            backend.url(),
            trust.inbound(""),
            idp.url(),
            secret_file.display()
        ),
    );
    support::wait_ready(proc.admin_addr).await;

    let good = trust.token_with(|_| {});
    let forged = format!("{}x", trust.token_with(|_| {}));
    // (path, what the IdP answers, client token, status the client gets)
    let steps = [
        (
            "/refused",
            Answer::error(400, Some("invalid_grant")),
            trust.token_with(|_| {}),
            401,
        ),
        (
            "/idp-down",
            Answer::error(503, None),
            trust.token_with(|_| {}),
            503,
        ),
        (
            "/exchanged",
            Answer::IssueToken {
                access_token: EXCHANGED.into(),
                expires_in: Some(300),
            },
            good.clone(),
            200,
        ),
        ("/cached", Answer::error(503, None), good.clone(), 200),
        ("/forged", Answer::issue(300), forged.clone(), 401),
    ];
    let c = client();
    for (i, (path, answer, token, status)) in steps.iter().enumerate() {
        idp.answer(answer.clone());
        let resp = c
            .get(format!(
                "http://{}{path}?access_token=query-secret-{i}&code=query-secret-x{i}",
                proc.addr
            ))
            .bearer_auth(token)
            .header("proxy-authorization", "Basic proxy-secret")
            .header("cookie", format!("session=cookie-secret-{i}"))
            .send()
            .await
            .expect("request");
        assert_eq!(resp.status(), *status, "{path}");
    }
    assert_eq!(
        backend.last().expect("forwarded").headers["authorization"],
        format!("Bearer {EXCHANGED}"),
        "the backend got the exchanged token"
    );
    assert_eq!(idp.calls(), 3, "refused, down, exchanged; then a cache hit");
    assert_eq!(idp.last().param("client_secret"), Some(CLIENT_SECRET));

    let ok = support::eventually(Duration::from_secs(5), async || {
        proc.logs
            .lock()
            .expect("lock")
            .iter()
            .filter(|l| l.contains("\"request\""))
            .count()
            >= steps.len()
    })
    .await;
    let logs = proc.logs.lock().expect("lock").join("\n");
    assert!(ok, "no access lines: {logs}");
    assert!(logs.contains("\"level\":\"DEBUG\""), "not at debug: {logs}");
    let mut secrets = vec![
        EXCHANGED.to_string(),
        CLIENT_SECRET.to_string(),
        "query-secret".into(),
        "access_token".into(),
        "proxy-secret".into(),
        "cookie-secret".into(),
    ];
    for (_, _, token, _) in &steps {
        secrets.push(token.clone());
        // The signature alone is as good as a leak of the token.
        secrets.push(token.rsplit('.').next().expect("signature").to_string());
    }
    for secret in &secrets {
        assert!(
            !logs.contains(secret.as_str()),
            "{secret} leaked into the logs:\n{logs}"
        );
    }
    let line: serde_json::Value = serde_json::from_str(
        logs.lines()
            .find(|l| l.contains("\"path\":\"/exchanged\""))
            .expect("access line for /exchanged"),
    )
    .expect("json");
    assert_eq!(line["status"], 200);
    assert_eq!(line["method"], "GET");
    assert_eq!(line["cache"], "miss");
    assert!(line["duration_ms"].is_number());
    assert!(line["bytes"].as_u64().expect("bytes") > 0);
}
