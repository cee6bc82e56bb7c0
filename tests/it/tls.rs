//! HTTPS on the proxy listener (README "HTTPS"): certificate renewal without a restart, ALPN,
//! `X-Forwarded-Proto`, `check-config` on the pair, and the real `curl` against the binary.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode, Version};
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use token_exchange_proxy::metrics::RefreshResult;
use token_exchange_proxy::server::{self, Running};
use token_exchange_proxy::tls::certificate_serial;

use crate::support::certs::{Ca, Leaf};
use crate::support::{self, Echo, Trust, echo, eventually, metric};

/// How often the in-process proxies look at their files: short, so renewals show quickly.
const TEST_POLL: Duration = Duration::from_millis(50);
/// Bound on how long a renewal may take to reach new connections (two polls, and a slow CI).
const RENEWAL_LIMIT: Duration = Duration::from_secs(10);

/// The pair's files in a scratch directory, and the CA that issues them.
struct Files {
    dir: tempfile::TempDir,
    ca: Ca,
}

impl Files {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir().expect("tempdir"),
            ca: Ca::new(),
        }
    }

    fn cert(&self) -> PathBuf {
        self.dir.path().join("tls.crt")
    }

    fn key(&self) -> PathBuf {
        self.dir.path().join("tls.key")
    }

    /// Writes a new pair with serial `serial` and returns it.
    fn renew(&self, serial: &[u8]) -> Leaf {
        let leaf = self.ca.issue(serial);
        leaf.write(&self.cert(), &self.key());
        leaf
    }

    /// The `tls:` line naming the two files.
    fn yaml(&self) -> String {
        format!(
            "tls: {{cert_file: '{}', key_file: '{}'}}\n",
            self.cert().display(),
            self.key().display()
        )
    }
}

/// A passthrough proxy with `tls` in front of an echo backend, polling its files every
/// [`TEST_POLL`].
async fn https_proxy(files: &Files) -> (Running, Trust, Echo) {
    let backend = echo().await;
    let trust = Trust::start().await;
    let mut config =
        support::config_from(&trust.passthrough(&backend.url(), "", "", &files.yaml()));
    if let Some(tls) = config.tls.as_mut() {
        tls.poll_interval = TEST_POLL;
    }
    let proxy = server::start(config).await.expect("proxy starts");
    support::wait_ready(proxy.admin_addr).await;
    (proxy, trust, backend)
}

/// One TLS connection to `addr` trusting `ca` and offering `alpn`: the stream, the serial of
/// the certificate the proxy presented, and the protocol negotiated.
async fn connect(
    addr: SocketAddr,
    ca: &Ca,
    alpn: &[&[u8]],
) -> (TlsStream<TcpStream>, String, Option<Vec<u8>>) {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der.clone()).expect("CA certificate");
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let name = ServerName::try_from("localhost").expect("server name");
    let stream = tokio::time::timeout(
        Duration::from_secs(10),
        TlsConnector::from(Arc::new(config)).connect(name, tcp),
    )
    .await
    .expect("handshake in time")
    .expect("handshake");
    let (_, session) = stream.get_ref();
    let presented = session
        .peer_certificates()
        .and_then(|chain| chain.first())
        .expect("a certificate");
    let serial = certificate_serial(presented).expect("serial");
    let alpn = session.alpn_protocol().map(<[u8]>::to_vec);
    (stream, serial, alpn)
}

/// An HTTP/1.1 connection over `stream`, kept open for further requests.
async fn h1(stream: TlsStream<TcpStream>) -> http1::SendRequest<Empty<Bytes>> {
    let (send, conn) = http1::handshake(TokioIo::new(stream))
        .await
        .expect("HTTP/1.1");
    tokio::spawn(conn);
    send
}

/// `GET path` on an open HTTP/1.1 connection with the client token: the status, once the
/// whole body arrived.
async fn get_h1(
    send: &mut http1::SendRequest<Empty<Bytes>>,
    trust: &Trust,
    path: &str,
) -> StatusCode {
    send.ready().await.expect("connection usable");
    let req = Request::get(path)
        .header("host", "localhost")
        .header("authorization", trust.bearer())
        .body(Empty::new())
        .expect("request");
    let resp = send.send_request(req).await.expect("response");
    let status = resp.status();
    resp.into_body().collect().await.expect("body");
    status
}

/// The serial a new connection is presented, once it equals `want` (or after [`RENEWAL_LIMIT`]).
async fn new_connections_see(addr: SocketAddr, ca: &Ca, want: &str) -> bool {
    eventually(RENEWAL_LIMIT, async || {
        connect(addr, ca, &[b"http/1.1"]).await.1 == want
    })
    .await
}

#[tokio::test]
async fn a_renewed_certificate_reaches_new_connections_and_old_ones_keep_working() {
    let files = Files::new();
    files.renew(&[0x0A, 0x01]);
    let (proxy, trust, backend) = https_proxy(&files).await;

    // A keep-alive connection opened with certificate A.
    let (stream, serial, _) = connect(proxy.addr, &files.ca, &[b"http/1.1"]).await;
    assert_eq!(serial, "0A01");
    let mut old = h1(stream).await;
    assert_eq!(get_h1(&mut old, &trust, "/before").await, 200);
    let seen = backend.last().expect("forwarded");
    assert_eq!(seen.headers["x-forwarded-proto"], "https");

    // cert-manager renews: new connections get B, with no restart.
    files.renew(&[0x0B, 0x02]);
    assert!(
        new_connections_see(proxy.addr, &files.ca, "0B02").await,
        "certificate B never reached a new connection"
    );
    assert_eq!(proxy.metrics.tls_reloads.get(RefreshResult::Success), 1);

    // The connection opened before the renewal still serves requests.
    assert_eq!(get_h1(&mut old, &trust, "/after").await, 200);
    assert_eq!(backend.last().expect("forwarded").uri.path(), "/after");

    // A broken pair (a new certificate with B's key) is refused; B stays.
    let next = files.ca.issue(&[0x0C, 0x03]);
    std::fs::write(files.cert(), &next.chain_pem).expect("write certificate");
    let admin = proxy.admin_addr;
    let refused = eventually(RENEWAL_LIMIT, async || {
        metric(admin, "txp_tls_reloads_total{result=\"failure\"}").await == Some(1.0)
    })
    .await;
    assert!(refused, "the broken pair was not refused");
    let (_, serial, _) = connect(proxy.addr, &files.ca, &[b"http/1.1"]).await;
    assert_eq!(serial, "0B02", "the broken pair must not replace B");
    assert_eq!(
        metric(admin, "txp_tls_reloads_total{result=\"success\"}").await,
        Some(1.0)
    );

    // Garbage in both files: refused too, and B is still served.
    std::fs::write(files.cert(), "not a certificate").expect("write");
    std::fs::write(files.key(), "not a key").expect("write");
    let refused_again = eventually(RENEWAL_LIMIT, async || {
        proxy.metrics.tls_reloads.get(RefreshResult::Failure) == 2
    })
    .await;
    assert!(refused_again, "the garbage pair was not refused");
    let (stream, serial, _) = connect(proxy.addr, &files.ca, &[b"http/1.1"]).await;
    assert_eq!(serial, "0B02");
    let mut fresh = h1(stream).await;
    assert_eq!(get_h1(&mut fresh, &trust, "/fresh").await, 200);
}

#[tokio::test]
async fn alpn_negotiates_h2_and_http_1_1() {
    let files = Files::new();
    files.renew(&[0x21]);
    let (proxy, trust, backend) = https_proxy(&files).await;

    // HTTP/2: ALPN `h2` (RFC 7301 §3.1), then an h2 request over it.
    let (stream, _, alpn) = connect(proxy.addr, &files.ca, &[b"h2", b"http/1.1"]).await;
    assert_eq!(alpn.as_deref(), Some(&b"h2"[..]));
    let (mut send, conn) = http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
        .await
        .expect("HTTP/2");
    tokio::spawn(conn);
    let req = Request::get("https://localhost/h2")
        .header("authorization", trust.bearer())
        .body(Empty::<Bytes>::new())
        .expect("request");
    let resp = send.send_request(req).await.expect("response");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.version(), Version::HTTP_2);
    assert_eq!(
        backend.last().expect("forwarded").headers["x-forwarded-proto"],
        "https"
    );

    // HTTP/1.1: ALPN `http/1.1`.
    let (stream, _, alpn) = connect(proxy.addr, &files.ca, &[b"http/1.1"]).await;
    assert_eq!(alpn.as_deref(), Some(&b"http/1.1"[..]));
    let mut send = h1(stream).await;
    assert_eq!(get_h1(&mut send, &trust, "/h1").await, 200);
}

#[tokio::test]
async fn a_stalled_handshake_does_not_hold_up_other_connections() {
    let files = Files::new();
    files.renew(&[0x31]);
    let (proxy, trust, _backend) = https_proxy(&files).await;
    // Connected, but never a ClientHello.
    let _silent = TcpStream::connect(proxy.addr).await.expect("connect");
    let (stream, serial, _) = connect(proxy.addr, &files.ca, &[b"http/1.1"]).await;
    assert_eq!(serial, "31");
    let mut send = h1(stream).await;
    assert_eq!(get_h1(&mut send, &trust, "/").await, 200);
}

/// Runs the real `curl` against `url`, trusting `ca_file`, with `flag` (`--http2` or
/// `--http1.1`): the exit status and `<http_version> <status>`.
async fn curl(flag: &str, url: &str, ca_file: &std::path::Path, bearer: &str) -> (bool, String) {
    let out = tokio::process::Command::new("curl")
        .args([
            "--silent",
            "--show-error",
            "--max-time",
            "20",
            "--output",
            "/dev/null",
        ])
        .args(["--write-out", "%{http_version} %{http_code}", flag])
        .arg("--cacert")
        .arg(ca_file)
        .args(["--header", &format!("authorization: {bearer}")])
        .arg(url)
        .output()
        .await
        .expect("curl runs (install the curl package)");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[tokio::test]
async fn curl_gets_http2_and_http_1_1_from_the_binary() {
    let files = Files::new();
    files.renew(&[0x41]);
    let ca_file = files.dir.path().join("ca.pem");
    std::fs::write(&ca_file, &files.ca.pem).expect("write CA");
    let backend = echo().await;
    let trust = Trust::start().await;
    let proc =
        support::ProxyProcess::spawn(&trust.passthrough(&backend.url(), "", "", &files.yaml()));
    support::wait_ready(proc.admin_addr).await;
    let url = format!("https://localhost:{}/curl", proc.addr.port());
    let url_ip = format!("https://127.0.0.1:{}/curl", proc.addr.port());
    for (flag, url, want) in [
        ("--http2", &url, "2 200"),
        ("--http1.1", &url, "1.1 200"),
        ("--http2", &url_ip, "2 200"),
    ] {
        let (ok, out) = curl(flag, url, &ca_file, &trust.bearer()).await;
        assert!(ok, "curl {flag} {url}: {out}");
        assert_eq!(out, want, "curl {flag} {url}");
    }
    assert_eq!(
        backend.last().expect("forwarded").headers["x-forwarded-proto"],
        "https"
    );
    let logs = proc.logs.lock().expect("logs").join("\n");
    assert!(logs.contains("serving HTTPS"), "{logs}");
    assert!(logs.contains("\"serial\":\"41\""), "{logs}");
}

/// Runs `check-config` on `yaml` written to a file in `dir`.
fn check_config(dir: &std::path::Path, yaml: &str) -> (i32, String, String) {
    let path = dir.join("config.yaml");
    std::fs::write(
        &path,
        format!(
            "mode: passthrough\nupstream: {{url: 'http://127.0.0.1:8000'}}\ninbound: {{issuer: 'https://idp.example.com', audiences: [mcp]}}\n{yaml}"
        ),
    )
    .expect("write config");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_token-exchange-proxy"))
        .args(["check-config", "--config"])
        .arg(&path)
        .output()
        .expect("run check-config");
    (
        out.status.code().expect("exit code"),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_config_reads_and_matches_the_pair() {
    let files = Files::new();
    let a = files.renew(&[0x51]);
    let (code, stdout, stderr) = check_config(files.dir.path(), &files.yaml());
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("key matches the certificate (serial 51)"),
        "{stdout}"
    );
    assert!(stdout.contains("cert_file:"), "{stdout}");

    // The key of another certificate: exit 64, naming tls.key_file, quoting no key.
    let b = files.ca.issue(&[0x52]);
    std::fs::write(files.key(), &b.key_pem).expect("write key");
    let (code, stdout, stderr) = check_config(files.dir.path(), &files.yaml());
    assert_eq!(code, 64, "{stdout}{stderr}");
    assert!(
        stderr.starts_with("config error: tls.key_file: "),
        "{stderr}"
    );
    assert!(stderr.contains("does not match"), "{stderr}");
    for pem in [&a.key_pem, &b.key_pem] {
        let body = pem.lines().nth(1).expect("a base64 line");
        assert!(!stderr.contains(body) && !stdout.contains(body));
    }

    // A missing certificate file.
    std::fs::remove_file(files.cert()).expect("remove");
    let (code, _, stderr) = check_config(files.dir.path(), &files.yaml());
    assert_eq!(code, 64);
    assert!(
        stderr.starts_with("config error: tls.cert_file: cannot read"),
        "{stderr}"
    );
}

#[test]
fn tls_without_its_files_exits_64_naming_both_keys() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (code, _, stderr) = check_config(dir.path(), "tls: {}\n");
    assert_eq!(code, 64);
    assert!(
        stderr.contains("config error: tls.cert_file: required"),
        "{stderr}"
    );
    assert!(
        stderr.contains("config error: tls.key_file: required"),
        "{stderr}"
    );
    let (code, _, stderr) = check_config(dir.path(), "tls: {cert_file: /x, keyfile: /y}\n");
    assert_eq!(code, 64);
    assert!(stderr.contains("keyfile"), "{stderr}");
}
