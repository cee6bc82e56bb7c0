//! Micro-benchmarks of the per-request work of the proxy, without sockets, for profiling the
//! cache-hit path: bearer-token extraction, validation of an already-seen token, validation
//! of a new token (ES256 signature), an exchange served from the cache, the header rewrite,
//! the access-log line and its timestamp, and all of the cache-hit steps together: the
//! request through the validation and exchange layers in front of a service that answers at
//! once.
//!
//! The validator and the exchanger are the real ones, built from a config and talking to the
//! in-process fake IdP of `benches/support/fake_idp.rs` on 127.0.0.1:0.
//!
//! ```text
//! cargo bench --bench hot_path                 # all
//! cargo bench --bench hot_path -- exchange     # those whose name contains "exchange"
//! ```
//!
//! Async steps are driven with `Runtime::block_on`; the `block_on_ready` case measures that
//! harness overhead so it can be subtracted.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use tokio::runtime::Runtime;

use token_exchange_proxy::exchange::Exchanger;
use token_exchange_proxy::inbound::{self, Validator};
use token_exchange_proxy::proxy::{self, headers};
use token_exchange_proxy::{Protection, config, logging};
use tower::{ServiceBuilder, ServiceExt};

#[allow(dead_code)]
#[path = "support/fake_idp.rs"]
mod fake_idp;

/// How long the set-up waits for the JWKS to load before giving up.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// The proxy's components, wired to a fake IdP running on `rt`.
struct Fixture {
    rt: Runtime,
    idp: Arc<fake_idp::FakeIdp>,
    protection: Protection,
    validator: Arc<Validator>,
    exchanger: Arc<Exchanger>,
    max_token_bytes: usize,
    upstream_host: HeaderValue,
    _dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("tokio runtime");
        let dir = tempfile::tempdir().expect("temp dir");
        let secret = dir.path().join("client-secret");
        std::fs::write(&secret, "bench-secret").expect("write the client secret");

        let (idp, listener) = rt
            .block_on(fake_idp::FakeIdp::bind(
                SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
                Duration::ZERO,
                fake_idp::DEFAULT_TOKEN_BYTES,
            ))
            .expect("bind the fake IdP");
        rt.spawn(idp.clone().serve(listener));

        let issuer = idp.issuer().to_owned();
        let yaml = format!(
            "listen: 127.0.0.1:0\n\
             admin_listen: 127.0.0.1:1\n\
             mode: exchange\n\
             upstream: {{url: 'http://127.0.0.1:9'}}\n\
             inbound: {{issuer: '{issuer}', audiences: ['{aud}']}}\n\
             exchange:\n  token_endpoint: '{issuer}/token'\n  client_id: txp-bench\n  \
             client_auth: {{method: client_secret_post, secret_file: '{secret}'}}\n  \
             audience: [bench-backend]\n",
            aud = fake_idp::AUDIENCE,
            secret = secret.display(),
        );
        let raw = config::parse_yaml(&yaml).expect("bench config parses");
        let cfg = config::validate(raw).expect("bench config is valid");

        let protection = rt.block_on(async {
            let protection = Protection::start(&cfg).expect("protection");
            let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
            while protection.readiness.check().is_err() {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "the validator did not become ready"
                );
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            protection
        });
        let validator = protection.validator().clone();
        let exchanger = protection.exchanger().expect("exchange mode").clone();
        Self {
            rt,
            idp,
            protection,
            validator,
            exchanger,
            max_token_bytes: cfg.inbound().max_token_bytes,
            upstream_host: HeaderValue::from_static("127.0.0.1:9"),
            _dir: dir,
        }
    }

    /// Request headers as a typical MCP client sends them, in a map with the spare room
    /// hyper's parser leaves (`with_capacity` of the header count; a clone would have none,
    /// and every insert would then grow it).
    fn request_headers(token: &str) -> HeaderMap {
        let mut h = HeaderMap::with_capacity(6);
        h.insert(header::HOST, HeaderValue::from_static("mcp.example.com"));
        h.insert(
            header::USER_AGENT,
            HeaderValue::from_static("bench-client/1.0"),
        );
        h.insert(
            header::ACCEPT,
            HeaderValue::from_static("application/json, text/event-stream"),
        );
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        h.insert(
            HeaderName::from_static("mcp-protocol-version"),
            HeaderValue::from_static("2025-11-25"),
        );
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {token}")).expect("token is a header value"),
        );
        h
    }
}

fn benches(c: &mut Criterion) {
    let f = Fixture::new();
    let token = f.idp.mint("hot", 0);
    let headers_in = Fixture::request_headers(&token);

    // Warm the caches with the token used by the cache-hit cases, as the request path does.
    let key = f.exchanger.key(&token);
    let principal =
        f.rt.block_on(f.validator.validate(&token))
            .expect("the minted token validates");
    f.rt.block_on(f.exchanger.exchange_keyed(&token, &key, &principal))
        .expect("the fake IdP exchanges the token");
    assert_eq!(f.idp.token_calls(), 1, "one exchange while warming");
    let epoch = f.validator.key_epoch();
    assert!(
        f.rt.block_on(f.exchanger.cached(&key, epoch)).is_some(),
        "the exchange is served from the cache"
    );

    c.bench_function("block_on_ready", |b| {
        b.iter(|| f.rt.block_on(std::future::ready(std::hint::black_box(1u8))))
    });

    c.bench_function("bearer_token", |b| {
        b.iter(|| {
            inbound::bearer_token(std::hint::black_box(&headers_in), f.max_token_bytes)
                .map(str::len)
        })
    });

    c.bench_function("token_digest_sha256", |b| {
        b.iter(|| inbound::cache::digest(std::hint::black_box(&token)))
    });

    c.bench_function("exchange/cache_key", |b| {
        b.iter(|| f.exchanger.key(std::hint::black_box(&token)))
    });

    c.bench_function("validate/cached", |b| {
        b.iter(|| {
            f.rt.block_on(f.validator.validate(std::hint::black_box(&token)))
        })
    });

    let mut n = 0usize;
    c.bench_function("validate/new_token_es256", |b| {
        b.iter_batched(
            || {
                n += 1;
                f.idp.mint("fresh", n)
            },
            |t| f.rt.block_on(f.validator.validate(&t)),
            BatchSize::SmallInput,
        )
    });

    c.bench_function("exchange/cache_hit", |b| {
        b.iter(|| {
            f.rt.block_on(f.exchanger.cached(std::hint::black_box(&key), epoch))
        })
    });

    let client_ip = proxy::ClientIp::new(IpAddr::V4(Ipv4Addr::LOCALHOST), &[]);
    c.bench_function("prepare_request", |b| {
        b.iter_batched(
            || Fixture::request_headers(&token),
            |mut h| {
                let original = h.get(header::HOST).cloned();
                headers::prepare_request(
                    &mut h,
                    &client_ip,
                    original,
                    "http",
                    &f.upstream_host,
                    false,
                );
                h
            },
            BatchSize::SmallInput,
        )
    });

    // The access-log line as the proxy formats it (JSON), into a buffer instead of stdout.
    let record = logging::AccessRecord {
        method: "POST",
        path: "/mcp",
        status: 200,
        duration: Duration::from_micros(380),
        bytes: 64,
        outcome: "forwarded",
        cache: "hit",
        sub: "user-hot-0",
        body: "complete",
    };
    let mut line = Vec::with_capacity(512);
    c.bench_function("access_log/json_line", |b| {
        b.iter(|| {
            line.clear();
            let ts = logging::Timestamp::now();
            logging::format_access(
                config::LogFormat::Json,
                &ts,
                std::hint::black_box(&record),
                &mut line,
            );
            line.len()
        })
    });

    // The access line's RFC 3339 timestamp alone, at a fixed time so that reading the clock is
    // not measured.
    let at = std::time::UNIX_EPOCH + Duration::new(1_795_737_600, 123_456_789);
    let mut stamp = Vec::with_capacity(32);
    c.bench_function("access_log/timestamp", |b| {
        b.iter(|| {
            stamp.clear();
            logging::Timestamp::from(std::hint::black_box(at)).write(&mut stamp);
            stamp.len()
        })
    });

    // Everything the proxy does for a cache hit except I/O and the access log: the request
    // through the validation and exchange layers (one lookup of the exchanged token, which
    // carries the acceptance), then the header rewrite, in front of a service that answers
    // at once.
    let answer = tower::service_fn(|req: http::Request<()>| async move {
        Ok::<_, std::convert::Infallible>(http::Response::new(req.headers().len()))
    });
    let stack = f.rt.block_on(async {
        ServiceBuilder::new()
            .layer(f.protection.bearer_auth())
            .layer(f.protection.token_exchange().expect("exchange mode"))
            .map_request(move |mut req: http::Request<()>| {
                let original = req.headers().get(header::HOST).cloned();
                headers::prepare_request(
                    req.headers_mut(),
                    &client_ip,
                    original,
                    "http",
                    &f.upstream_host,
                    false,
                );
                req
            })
            .service(answer)
    });
    c.bench_function("request_path/cache_hit_no_io", |b| {
        b.iter_batched(
            || {
                let mut req = http::Request::new(());
                *req.headers_mut() = Fixture::request_headers(&token);
                (stack.clone(), req)
            },
            |(svc, req)| {
                f.rt.block_on(async {
                    let resp = svc.oneshot(req).await.expect("infallible");
                    assert_eq!(resp.status(), 200);
                    resp
                })
            },
            BatchSize::SmallInput,
        )
    });
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(50)
}

criterion_group! {
    name = hot_path;
    config = config();
    targets = benches
}
criterion_main!(hot_path);
