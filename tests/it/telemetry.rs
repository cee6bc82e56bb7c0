//! Traces (README "Traces"): spans exported over OTLP/HTTP to a receiver that decodes them with
//! the official protobuf definitions; the client's `traceparent` continued, and passed to the
//! IdP of each profile and to the backend; nothing secret in any attribute; requests
//! unaffected by a collector that is down or stalled.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use tokio::net::TcpListener;

use token_exchange_proxy::metrics::SpanDrop;
use token_exchange_proxy::server::Running;

use crate::support::issuer::{Issuer, Key};
use crate::support::otlp::{Received, Receiver};
use crate::support::token_endpoint::{ClientAuth, TokenEndpoint};
use crate::support::{Echo, client, echo, eventually, metric, proxy, wait_ready};

/// The client's trace, as its `traceparent` names it (W3C Trace Context §3.2).
const CLIENT_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";
/// A `sub` that must appear in no attribute.
const SUB: &str = "sub-5e1f-never-traced";
/// The corp profile's client secret at its IdP.
const SECRET: &str = "s3cret-never-traced";

/// Two issuers (profiles `corp` and `partner`), each with its own token endpoint, an echo
/// backend, and the proxy exporting to `otlp_endpoint`.
struct Traced {
    proxy: Running,
    backend: Echo,
    corp: (Issuer, Key, TokenEndpoint),
    partner: (Issuer, Key, TokenEndpoint),
    _dir: tempfile::TempDir,
}

impl Traced {
    async fn start(otlp_endpoint: &str, sample_ratio: f64) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let secret_file = dir.path().join("secret");
        std::fs::write(&secret_file, SECRET).expect("write secret");
        let (corp_issuer, corp_key) = (Issuer::start().await, Key::ec("corp-1"));
        corp_issuer.publish(&[&corp_key]);
        let corp_idp = TokenEndpoint::start(ClientAuth::Basic {
            id: "txp".into(),
            secret: SECRET.into(),
        })
        .await;
        let (partner_issuer, partner_key) = (Issuer::start().await, Key::ec("partner-1"));
        partner_issuer.publish(&[&partner_key]);
        let partner_idp = TokenEndpoint::start(ClientAuth::None { id: "txp".into() }).await;
        let backend = echo().await;
        let yaml = format!(
            "upstream: {{url: '{}'}}\n\
             telemetry: {{otlp_endpoint: '{otlp_endpoint}', service_name: txp-test, sample_ratio: {sample_ratio}}}\n\
             profiles:\n\
             - name: corp\n  \
               inbound: {{issuer: '{}', audiences: [mcp]}}\n  \
               exchange: {{token_endpoint: '{}', client_id: txp, client_auth: {{method: client_secret_basic, secret_file: '{}'}}, audience: [backend], scope: notes.read}}\n\
             - name: partner\n  \
               inbound: {{issuer: '{}', audiences: [mcp]}}\n  \
               exchange: {{token_endpoint: '{}', client_id: txp, client_auth: {{method: none}}, audience: [backend], scope: notes.read}}\n",
            backend.url(),
            corp_issuer.url(),
            corp_idp.url(),
            secret_file.display(),
            partner_issuer.url(),
            partner_idp.url(),
        );
        let proxy = proxy(&yaml).await;
        wait_ready(proxy.admin_addr).await;
        Self {
            proxy,
            backend,
            corp: (corp_issuer, corp_key, corp_idp),
            partner: (partner_issuer, partner_key, partner_idp),
            _dir: dir,
        }
    }

    /// A token of `profile`'s issuer for [`SUB`].
    fn token(profile: &(Issuer, Key, TokenEndpoint)) -> String {
        let (issuer, key, _) = profile;
        let mut claims = issuer.claims("mcp", "notes.read");
        claims["sub"] = SUB.into();
        key.sign(&key.header(), &claims)
    }

    /// `GET /mcp?q=…` with `token` and, if given, a `traceparent`: the status.
    async fn get(&self, token: &str, traceparent: Option<&str>) -> u16 {
        let mut req = client()
            .get(format!(
                "http://{}/mcp?session=query-never-traced",
                self.proxy.addr
            ))
            .header("authorization", format!("Bearer {token}"))
            .header("cookie", "session=cookie-never-traced");
        if let Some(tp) = traceparent {
            req = req.header("traceparent", tp);
        }
        req.send().await.expect("request").status().as_u16()
    }
}

/// The spans of `trace_id` once `count` of them arrived (or what there is after 15 s).
async fn trace_of(receiver: &Receiver, trace_id: &str, count: usize) -> Vec<Received> {
    eventually(Duration::from_secs(15), async || {
        receiver.trace(trace_id).len() >= count
    })
    .await;
    receiver.trace(trace_id)
}

/// The span named `name` among `spans`.
fn named<'a>(spans: &'a [Received], name: &str) -> &'a Received {
    spans
        .iter()
        .find(|s| s.span.name == name)
        .unwrap_or_else(|| panic!("no span {name} in {:?}", names(spans)))
}

fn names(spans: &[Received]) -> Vec<&str> {
    spans.iter().map(|s| s.span.name.as_str()).collect()
}

/// `traceparent`'s parent-id field.
fn parent_id(traceparent: &str) -> &str {
    traceparent
        .split('-')
        .nth(2)
        .expect("traceparent parent-id")
}

fn trace_id(traceparent: &str) -> &str {
    traceparent.split('-').nth(1).expect("traceparent trace-id")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_is_one_span_with_three_children_continuing_the_clients_trace() {
    let receiver = Receiver::start().await;
    let t = Traced::start(&receiver.url(), 1.0).await;
    let token = Traced::token(&t.partner);
    let traceparent = format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01");
    assert_eq!(t.get(&token, Some(&traceparent)).await, 200);

    let spans = trace_of(&receiver, CLIENT_TRACE, 4).await;
    assert_eq!(spans.len(), 4, "{:?}", names(&spans));
    let request = named(&spans, "GET");
    assert_eq!(request.span.kind, SpanKind::Server as i32);
    assert_eq!(
        request.parent_span_id(),
        CLIENT_SPAN,
        "continues the client's span"
    );
    let attributes = request.attributes();
    let want: HashMap<&str, &str> = [
        ("http.request.method", "GET"),
        ("http.response.status_code", "200"),
        ("url.path", "/mcp"),
        ("txp.outcome", "forwarded"),
        ("txp.cache", "miss"),
    ]
    .into();
    for (key, value) in &want {
        assert_eq!(
            attributes.get(*key).map(String::as_str),
            Some(*value),
            "{key} in {attributes:?}"
        );
    }
    let service = request
        .resource
        .iter()
        .find(|kv| kv.key == "service.name")
        .map(|kv| crate::support::otlp::text(kv.value.as_ref()));
    assert_eq!(service.as_deref(), Some("txp-test"));

    // The three children of the request's span.
    let (validate, exchange, upstream) = (
        named(&spans, "validate"),
        named(&spans, "exchange"),
        named(&spans, "upstream"),
    );
    for child in [validate, exchange, upstream] {
        assert_eq!(
            child.parent_span_id(),
            request.span_id(),
            "{}",
            child.span.name
        );
        assert!(child.span.start_time_unix_nano >= request.span.start_time_unix_nano);
        assert!(child.span.end_time_unix_nano <= request.span.end_time_unix_nano);
    }
    assert_eq!(validate.attributes()["txp.validation"], "validated");
    assert_eq!(validate.attributes()["txp.profile"], "partner");
    assert_eq!(exchange.attributes()["txp.cache"], "miss");
    assert_eq!(exchange.attributes()["txp.profile"], "partner");
    assert_eq!(upstream.span.kind, SpanKind::Client as i32);
    assert_eq!(upstream.attributes()["http.response.status_code"], "200");
    assert_eq!(upstream.attributes()["server.address"], "127.0.0.1");

    // The IdP call carried the exchange span's traceparent; the backend, the upstream span's.
    let idp_seen = t.partner.2.last();
    let idp_tp = idp_seen
        .traceparent
        .as_deref()
        .expect("traceparent at the IdP");
    assert_eq!(trace_id(idp_tp), CLIENT_TRACE);
    assert_eq!(parent_id(idp_tp), exchange.span_id());
    let backend_seen = t.backend.last().expect("forwarded");
    let backend_tp = backend_seen.headers["traceparent"].to_str().expect("ascii");
    assert_eq!(trace_id(backend_tp), CLIENT_TRACE);
    assert_eq!(parent_id(backend_tp), upstream.span_id());

    // The same token again: a cache hit, recorded as such, still four spans.
    let again = "4bf92f3577b34da6a3ce929d0e0e4737";
    assert_eq!(
        t.get(&token, Some(&format!("00-{again}-{CLIENT_SPAN}-01")))
            .await,
        200
    );
    let hit = trace_of(&receiver, again, 4).await;
    assert_eq!(hit.len(), 4, "{:?}", names(&hit));
    assert_eq!(named(&hit, "GET").attributes()["txp.cache"], "hit");
    assert_eq!(named(&hit, "exchange").attributes()["txp.cache"], "hit");
    assert_eq!(
        named(&hit, "validate").attributes()["txp.validation"],
        "cached"
    );
    assert_eq!(t.partner.2.calls(), 1, "the hit made no IdP call");

    // The other profile's IdP call is traced the same way.
    let corp_trace = "0af7651916cd43dd8448eb211c80319c";
    let corp_token = Traced::token(&t.corp);
    assert_eq!(
        t.get(
            &corp_token,
            Some(&format!("00-{corp_trace}-{CLIENT_SPAN}-01"))
        )
        .await,
        200
    );
    let corp = trace_of(&receiver, corp_trace, 4).await;
    let corp_exchange = named(&corp, "exchange");
    assert_eq!(corp_exchange.attributes()["txp.profile"], "corp");
    let corp_tp = t.corp.2.last().traceparent.expect("traceparent at the IdP");
    assert_eq!(trace_id(&corp_tp), corp_trace);
    assert_eq!(parent_id(&corp_tp), corp_exchange.span_id());

    // No token, secret, `sub`, query or cookie in any span or resource attribute.
    let issued: Vec<String> = [&t.corp.2, &t.partner.2]
        .iter()
        .flat_map(|idp| idp.seen())
        .filter_map(|s| s.issued)
        .collect();
    assert_eq!(issued.len(), 2);
    let forbidden: Vec<&str> = [
        token.as_str(),
        corp_token.as_str(),
        SUB,
        SECRET,
        "query-never-traced",
        "cookie-never-traced",
    ]
    .into_iter()
    .chain(issued.iter().map(String::as_str))
    .collect();
    let all = receiver.spans();
    assert!(all.len() >= 12);
    for span in &all {
        for text in span.all_text() {
            for f in &forbidden {
                assert!(
                    !text.contains(f),
                    "{} carries a secret: {text}",
                    span.span.name
                );
            }
        }
    }
    assert_eq!(receiver.undecodable(), 0);
    let admin = t.proxy.admin_addr;
    let exported = all.len() as f64;
    let counted = eventually(Duration::from_secs(5), async || {
        metric(admin, "txp_trace_spans_exported_total").await == Some(exported)
    })
    .await;
    assert!(counted, "txp_trace_spans_exported_total is not {exported}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_token_is_a_failed_validation_span_and_no_exchange() {
    let receiver = Receiver::start().await;
    let t = Traced::start(&receiver.url(), 1.0).await;
    let (issuer, key, _) = &t.partner;
    let mut claims = issuer.claims("mcp", "notes.read");
    claims["exp"] = (crate::support::issuer::now() - 3600).into();
    let expired = key.sign(&key.header(), &claims);
    let trace = "11111111111111111111111111111111";
    assert_eq!(
        t.get(&expired, Some(&format!("00-{trace}-{CLIENT_SPAN}-01")))
            .await,
        401
    );
    let spans = trace_of(&receiver, trace, 2).await;
    assert_eq!(names(&spans).len(), 2, "{:?}", names(&spans));
    let validate = named(&spans, "validate");
    assert_eq!(validate.attributes()["error.type"], "expired");
    let request = named(&spans, "GET");
    assert_eq!(request.attributes()["http.response.status_code"], "401");
    assert_eq!(request.attributes()["txp.outcome"], "invalid_token");
    assert!(!request.attributes().contains_key("txp.cache"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsampled_requests_export_nothing_but_still_propagate() {
    let receiver = Receiver::start().await;
    let t = Traced::start(&receiver.url(), 0.0).await;
    let token = Traced::token(&t.partner);
    // No traceparent: a new trace, not sampled at ratio 0.
    assert_eq!(t.get(&token, None).await, 200);
    let backend_tp = t.backend.last().expect("forwarded").headers["traceparent"]
        .to_str()
        .expect("ascii")
        .to_owned();
    assert!(backend_tp.ends_with("-00"), "{backend_tp}");
    // The client's sampled decision is followed (parent-based sampling).
    let trace = "22222222222222222222222222222222";
    assert_eq!(
        t.get(&token, Some(&format!("00-{trace}-{CLIENT_SPAN}-01")))
            .await,
        200
    );
    let spans = trace_of(&receiver, trace, 4).await;
    assert_eq!(spans.len(), 4, "{:?}", names(&spans));
    assert_eq!(
        receiver.spans().len(),
        4,
        "the unsampled request exported nothing"
    );
}

/// Requests through a proxy exporting to `endpoint`: all answered 200, each within `limit`.
async fn requests_unaffected(t: &Traced, n: usize, limit: Duration) {
    let token = Traced::token(&t.partner);
    for i in 0..n {
        let started = Instant::now();
        assert_eq!(t.get(&token, None).await, 200, "request {i}");
        let took = started.elapsed();
        assert!(took < limit, "request {i} took {took:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_collector_down_requests_are_unaffected_and_drops_counted() {
    // A port nobody listens on: every export is refused.
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        l.local_addr().expect("addr").port()
    };
    let t = Traced::start(&format!("http://127.0.0.1:{port}"), 1.0).await;
    requests_unaffected(&t, 50, Duration::from_secs(2)).await;
    let admin = t.proxy.admin_addr;
    let counted = eventually(Duration::from_secs(20), async || {
        metric(
            admin,
            "txp_trace_spans_dropped_total{reason=\"export_failed\"}",
        )
        .await
        .is_some_and(|v| v >= 200.0)
    })
    .await;
    assert!(
        counted,
        "the 200 spans of 50 requests were not counted as dropped"
    );
    assert_eq!(t.proxy.metrics.spans_dropped.get(SpanDrop::QueueFull), 0);
    assert_eq!(
        metric(admin, "txp_trace_spans_exported_total").await,
        Some(0.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_collector_stalled_requests_are_unaffected() {
    // Accepts connections and never answers: every export waits for its timeout.
    let stalled = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = stalled.local_addr().expect("addr");
    let accepted = Arc::new(AtomicUsize::new(0));
    let seen = accepted.clone();
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((conn, _)) = stalled.accept().await {
            seen.fetch_add(1, Ordering::SeqCst);
            open.push(conn);
        }
    });
    let t = Traced::start(&format!("http://{addr}"), 1.0).await;
    requests_unaffected(&t, 1, Duration::from_secs(2)).await;
    // An export is now stuck on the collector for up to its timeout (5 s) ...
    let stuck = eventually(Duration::from_secs(10), async || {
        accepted.load(Ordering::SeqCst) > 0
    })
    .await;
    assert!(stuck, "no export reached the collector");
    // ... and requests meanwhile take no longer than ever: none waits for it.
    requests_unaffected(&t, 50, Duration::from_secs(2)).await;
    let admin = t.proxy.admin_addr;
    let counted = eventually(Duration::from_secs(20), async || {
        metric(
            admin,
            "txp_trace_spans_dropped_total{reason=\"export_failed\"}",
        )
        .await
        .is_some_and(|v| v > 0.0)
    })
    .await;
    assert!(counted, "a timed-out export was not counted");
    held.abort();
}
