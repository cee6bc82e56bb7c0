//! Prometheus metrics, kept in atomics and rendered as text on the admin listener.
//!
//! Every label has a closed set of values (an enum, an HTTP status code, or `aborted`), so no
//! label can ever carry a token, a subject or a path. Updating a metric on the request path is one
//! relaxed atomic add.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Buckets for request and exchange latency, in seconds.
const LATENCY_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// A histogram with fixed [`LATENCY_BUCKETS`].
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; LATENCY_BUCKETS.len()],
    count: AtomicU64,
    sum_nanos: AtomicU64,
}

impl Histogram {
    /// Records one observation.
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        if let Some(i) = LATENCY_BUCKETS.iter().position(|b| secs <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    /// Number of observations so far.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (b, n) in LATENCY_BUCKETS.iter().zip(&self.buckets) {
            cumulative += n.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {cumulative}");
        }
        let count = self.count();
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let sum = self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {count}");
    }
}

/// A counter per value of a label whose values are the variants of `L`.
#[derive(Debug)]
pub struct LabeledCounter<L: Label> {
    values: Vec<AtomicU64>,
    _label: std::marker::PhantomData<L>,
}

/// A closed set of label values.
pub trait Label: Copy + 'static {
    /// Every value, in rendering order.
    const ALL: &'static [Self];
    /// The label's name, e.g. `reason`.
    const NAME: &'static str;
    /// Position in [`Label::ALL`].
    fn index(self) -> usize;
    /// The value as rendered.
    fn as_str(self) -> &'static str;
}

impl<L: Label> Default for LabeledCounter<L> {
    fn default() -> Self {
        Self {
            values: L::ALL.iter().map(|_| AtomicU64::new(0)).collect(),
            _label: std::marker::PhantomData,
        }
    }
}

impl<L: Label> LabeledCounter<L> {
    /// Adds one for `label`.
    pub fn inc(&self, label: L) {
        self.values[label.index()].fetch_add(1, Ordering::Relaxed);
    }

    /// Adds `n` for `label`.
    pub fn add(&self, label: L, n: u64) {
        self.values[label.index()].fetch_add(n, Ordering::Relaxed);
    }

    /// Current value for `label`.
    pub fn get(&self, label: L) -> u64 {
        self.values[label.index()].load(Ordering::Relaxed)
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
        for l in L::ALL {
            let v = self.values[l.index()].load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}{{{}=\"{}\"}} {v}", L::NAME, l.as_str());
        }
    }
}

/// A [`LabeledCounter`] per profile (README "Several issuers"): with named profiles it gains a
/// `profile` label, whose values are the profiles' names and `""` (a request no profile
/// could be told for, e.g. one without a token); without, it renders as a plain
/// [`LabeledCounter`].
#[derive(Debug)]
pub struct ProfileCounter<L: Label> {
    /// Slot 0: no profile (and the only slot without named profiles); slot `i + 1`: profile `i`.
    slots: Vec<LabeledCounter<L>>,
    names: Arc<[String]>,
}

impl<L: Label> Default for ProfileCounter<L> {
    fn default() -> Self {
        Self::new(Arc::from([]))
    }
}

impl<L: Label> ProfileCounter<L> {
    fn new(names: Arc<[String]>) -> Self {
        Self {
            slots: (0..=names.len())
                .map(|_| LabeledCounter::default())
                .collect(),
            names,
        }
    }

    /// Adds one for `label`, for no profile in particular.
    pub fn inc(&self, label: L) {
        self.inc_for(None, label);
    }

    /// Adds one for `label` and profile `profile` (its index in the config).
    pub fn inc_for(&self, profile: Option<usize>, label: L) {
        let slot = match profile {
            Some(i) if !self.names.is_empty() => (i + 1).min(self.slots.len() - 1),
            _ => 0,
        };
        self.slots[slot].inc(label);
    }

    /// Current value for `label`, over every profile.
    pub fn get(&self, label: L) -> u64 {
        self.slots.iter().map(|s| s.get(label)).sum()
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        if self.names.is_empty() {
            return self.slots[0].render(out, name, help);
        }
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
        for (slot, counter) in self.slots.iter().enumerate() {
            let profile = slot.checked_sub(1).map_or("", |i| self.names[i].as_str());
            for l in L::ALL {
                let v = counter.values[l.index()].load(Ordering::Relaxed);
                let _ = writeln!(
                    out,
                    "{name}{{{}=\"{}\",profile=\"{profile}\"}} {v}",
                    L::NAME,
                    l.as_str()
                );
            }
        }
    }
}

/// Declares a label enum with its rendered values.
macro_rules! label_enum {
    ($(#[$doc:meta])* $name:ident, $label:literal, { $($(#[$vdoc:meta])* $variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name { $($(#[$vdoc])* $variant),+ }
        impl Label for $name {
            const ALL: &'static [Self] = &[$(Self::$variant),+];
            const NAME: &'static str = $label;
            fn index(self) -> usize { self as usize }
            fn as_str(self) -> &'static str { match self { $(Self::$variant => $text),+ } }
        }
    };
}

label_enum!(
    /// Why a client token was refused (`txp_token_rejections_total{reason}`).
    RejectReason, "reason", {
    /// No `Authorization: Bearer` header.
    Missing => "missing",
    /// Not a well-formed token.
    Malformed => "malformed",
    /// The signature does not verify.
    Signature => "signature",
    /// No published key matches the token's `kid`.
    UnknownKey => "unknown_key",
    /// `alg` not allowed, or not consistent with the key.
    Algorithm => "algorithm",
    /// `iss` is not the configured issuer.
    Issuer => "issuer",
    /// `aud` contains none of the accepted audiences.
    Audience => "audience",
    /// `exp` passed (beyond leeway).
    Expired => "expired",
    /// `nbf` or `iat` in the future (beyond leeway).
    NotYetValid => "not_yet_valid",
    /// Longer than `inbound.max_token_bytes`.
    TooLarge => "too_large",
    /// Introspection says the token is not active.
    Inactive => "inactive",
    /// A required scope is missing.
    Scope => "scope",
});

label_enum!(
    /// Outcome of a call to the token endpoint (`txp_exchange_requests_total{result}`).
    ExchangeResult, "result", {
    Success => "success",
    /// The IdP refused the subject token or the requested scope.
    Rejected => "rejected",
    /// The IdP refused the proxy's own credentials.
    ClientError => "client_error",
    /// The IdP was unreachable, slow, or answered 5xx/429 (or the circuit was open).
    Unavailable => "unavailable",
    /// The IdP answered 200 with something unusable.
    InvalidResponse => "invalid_response",
});

label_enum!(
    /// Outcome of a JWKS fetch (`txp_jwks_refreshes_total{result}`), of an exchange ahead of
    /// time (`txp_exchange_refreshes_total{result}`) and of a TLS pair reload
    /// (`txp_tls_reloads_total{result}`).
    RefreshResult, "result", {
    Success => "success",
    Failure => "failure",
});

label_enum!(
    /// Why finished spans never reached the collector (`txp_trace_spans_dropped_total{reason}`).
    SpanDrop, "reason", {
    /// The export queue was full (the collector slow or absent): dropped at once, so that a
    /// request never waits for telemetry.
    QueueFull => "queue_full",
    /// The export failed or timed out (README "Traces").
    ExportFailed => "export_failed",
});

label_enum!(
    /// Why the proxy ended an event stream (`txp_streams_ended_total{reason}`).
    StreamEnd, "reason", {
    /// The client token it was opened with expired (`inbound.stream_lifetime: token`).
    TokenExpired => "token_expired",
    /// The proxy was shutting down.
    Shutdown => "shutdown",
});

label_enum!(
    /// Kind of upstream failure (`txp_upstream_errors_total{kind}`).
    UpstreamErrorKind, "kind", {
    /// Connection refused, reset or timed out while connecting.
    Connect => "connect",
    /// No response headers within `upstream.response_header_timeout`, or a body idle too long.
    Timeout => "timeout",
    /// Anything else: a malformed response, a connection closed mid-body.
    Protocol => "protocol",
});

/// Lowest and highest status codes counted individually.
const STATUS_MIN: u16 = 100;
const STATUS_MAX: u16 = 599;
/// The `status` of a request that ended before any response was sent (the client went away):
/// a word, so that it can never be read as an HTTP status.
pub const ABORTED_STATUS: &str = "aborted";

/// All of the proxy's metrics.
#[derive(Debug)]
pub struct Metrics {
    requests: Vec<AtomicU64>,
    /// Requests that ended before any status was sent (`status="aborted"`).
    aborted: AtomicU64,
    pub request_duration: Histogram,
    pub upstream_errors: LabeledCounter<UpstreamErrorKind>,
    pub token_rejections: ProfileCounter<RejectReason>,
    pub jwks_refreshes: LabeledCounter<RefreshResult>,
    /// Exchanges made ahead of an entry's end (`cache.refresh_ahead`).
    pub exchange_refreshes: LabeledCounter<RefreshResult>,
    /// Requests served a cached token past its serving window while the IdP was unavailable.
    pub stale_served: AtomicU64,
    /// Loads of a changed `tls.cert_file` / `tls.key_file` pair (README "HTTPS").
    pub tls_reloads: LabeledCounter<RefreshResult>,
    /// Finished spans exported to the OTLP collector (README "Traces").
    pub spans_exported: AtomicU64,
    /// Finished spans that never reached the collector, by reason.
    pub spans_dropped: LabeledCounter<SpanDrop>,
    /// Event streams the proxy ended, by reason.
    pub streams_ended: LabeledCounter<StreamEnd>,
    /// Cache entries removed by `POST /cache/purge`.
    pub cache_purged: AtomicU64,
    pub exchange_requests: ProfileCounter<ExchangeResult>,
    pub exchange_duration: Histogram,
    pub cache_hits: AtomicU64,
    pub cache_misses: AtomicU64,
    pub cache_coalesced: AtomicU64,
    /// Filled in at render time (the cache knows its own size).
    pub cache_entries: AtomicU64,
    /// Calls to the token endpoint in flight (`exchange.max_concurrent` bounds it).
    pub exchange_inflight: AtomicU64,
    /// Connections open on the proxy listener (each served by a task of its own).
    pub open_connections: AtomicU64,
    /// Tasks alive in the runtime; filled in at render time.
    pub runtime_tasks: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::with_profiles(&[])
    }
}

impl Metrics {
    /// The metrics of a proxy with these named profiles (none: the one-profile form, and no
    /// `profile` label).
    pub fn with_profiles(names: &[String]) -> Self {
        let names: Arc<[String]> = names.iter().filter(|n| !n.is_empty()).cloned().collect();
        Self {
            requests: (STATUS_MIN..=STATUS_MAX)
                .map(|_| AtomicU64::new(0))
                .collect(),
            aborted: AtomicU64::new(0),
            request_duration: Histogram::default(),
            upstream_errors: LabeledCounter::default(),
            token_rejections: ProfileCounter::new(names.clone()),
            jwks_refreshes: LabeledCounter::default(),
            exchange_refreshes: LabeledCounter::default(),
            stale_served: AtomicU64::new(0),
            tls_reloads: LabeledCounter::default(),
            spans_exported: AtomicU64::new(0),
            spans_dropped: LabeledCounter::default(),
            streams_ended: LabeledCounter::default(),
            cache_purged: AtomicU64::new(0),
            exchange_requests: ProfileCounter::new(names),
            exchange_duration: Histogram::default(),
            cache_hits: AtomicU64::new(0),
            cache_misses: AtomicU64::new(0),
            cache_coalesced: AtomicU64::new(0),
            cache_entries: AtomicU64::new(0),
            exchange_inflight: AtomicU64::new(0),
            open_connections: AtomicU64::new(0),
            runtime_tasks: AtomicU64::new(0),
        }
    }
}

impl Metrics {
    /// Counts one finished request; `status` 0: it ended before any response was sent.
    pub fn request(&self, status: u16, elapsed: Duration) {
        self.status_counter(status).fetch_add(1, Ordering::Relaxed);
        self.request_duration.observe(elapsed);
    }

    /// Requests counted with `status` (an HTTP status) so far.
    pub fn requests_with_status(&self, status: u16) -> u64 {
        match status {
            0 => 0,
            _ => self.status_counter(status).load(Ordering::Relaxed),
        }
    }

    /// Requests that ended before any response was sent, so far.
    pub fn aborted_requests(&self) -> u64 {
        self.aborted.load(Ordering::Relaxed)
    }

    /// The counter for `status`: below 100 there was no response; a status above 599 counts
    /// as 599.
    fn status_counter(&self, status: u16) -> &AtomicU64 {
        if status < STATUS_MIN {
            return &self.aborted;
        }
        &self.requests[usize::from(status.min(STATUS_MAX) - STATUS_MIN)]
    }

    /// Adds one to a plain counter.
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// The Prometheus text exposition (format 0.0.4).
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(8192);
        let _ = writeln!(
            out,
            "# HELP txp_requests_total Requests answered on the proxy listener, by status.\n# TYPE txp_requests_total counter"
        );
        for (i, n) in self.requests.iter().enumerate() {
            let v = n.load(Ordering::Relaxed);
            if v > 0 {
                let _ = writeln!(
                    out,
                    "txp_requests_total{{status=\"{}\"}} {v}",
                    i as u16 + STATUS_MIN
                );
            }
        }
        let aborted = self.aborted_requests();
        if aborted > 0 {
            let _ = writeln!(
                out,
                "txp_requests_total{{status=\"{ABORTED_STATUS}\"}} {aborted}"
            );
        }
        self.request_duration.render(
            &mut out,
            "txp_request_duration_seconds",
            "Time from request received to response body ended.",
        );
        self.upstream_errors.render(
            &mut out,
            "txp_upstream_errors_total",
            "Failures talking to the backend.",
        );
        self.token_rejections.render(
            &mut out,
            "txp_token_rejections_total",
            "Client tokens refused, by reason.",
        );
        self.jwks_refreshes.render(
            &mut out,
            "txp_jwks_refreshes_total",
            "JWKS fetches, by result.",
        );
        self.exchange_requests.render(
            &mut out,
            "txp_exchange_requests_total",
            "Token exchange calls to the IdP, by result.",
        );
        self.exchange_duration.render(
            &mut out,
            "txp_exchange_duration_seconds",
            "Duration of token exchange calls to the IdP.",
        );
        self.streams_ended.render(
            &mut out,
            "txp_streams_ended_total",
            "Event streams ended by the proxy (at an event boundary), by reason.",
        );
        self.exchange_refreshes.render(
            &mut out,
            "txp_exchange_refreshes_total",
            "Exchanges made ahead of a cached token's end, by result.",
        );
        self.tls_reloads.render(
            &mut out,
            "txp_tls_reloads_total",
            "Loads of a changed tls.cert_file/tls.key_file pair, by result (failure: the previous pair is still served).",
        );
        self.spans_dropped.render(
            &mut out,
            "txp_trace_spans_dropped_total",
            "Finished spans that never reached the OTLP collector, by reason.",
        );
        for (name, help, v) in [
            (
                "txp_exchange_cache_hits_total",
                "Requests served from the exchange cache.",
                &self.cache_hits,
            ),
            (
                "txp_exchange_cache_misses_total",
                "Requests that called the IdP.",
                &self.cache_misses,
            ),
            (
                "txp_exchange_cache_coalesced_total",
                "Requests that waited for another request's exchange of the same token.",
                &self.cache_coalesced,
            ),
            (
                "txp_cache_purged_total",
                "Cache entries (exchanged tokens and validation decisions) removed by POST /cache/purge.",
                &self.cache_purged,
            ),
            (
                "txp_exchange_stale_served_total",
                "Requests served a cached token past its serving window while the IdP was unavailable.",
                &self.stale_served,
            ),
            (
                "txp_trace_spans_exported_total",
                "Finished spans the OTLP collector accepted.",
                &self.spans_exported,
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                v.load(Ordering::Relaxed)
            );
        }
        for (name, help, v) in [
            (
                "txp_exchange_cache_entries",
                "Exchanged tokens held in the cache.",
                &self.cache_entries,
            ),
            (
                "txp_exchange_inflight",
                "Calls to the token endpoint in flight.",
                &self.exchange_inflight,
            ),
            (
                "txp_open_connections",
                "Connections open on the proxy listener.",
                &self.open_connections,
            ),
            (
                "txp_runtime_tasks",
                "Tasks alive in the proxy's runtime (connections, streams, background work).",
                &self.runtime_tasks,
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {}",
                v.load(Ordering::Relaxed)
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_lists_every_label_value_and_counts() {
        let m = Metrics::default();
        m.request(200, Duration::from_millis(3));
        m.request(200, Duration::from_millis(30));
        m.request(401, Duration::from_micros(10));
        m.token_rejections.inc(RejectReason::Expired);
        let text = m.render();
        assert!(
            text.contains("txp_requests_total{status=\"200\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("txp_requests_total{status=\"401\"} 1"),
            "{text}"
        );
        assert!(text.contains("txp_token_rejections_total{reason=\"expired\"} 1"));
        assert!(text.contains("txp_token_rejections_total{reason=\"not_yet_valid\"} 0"));
        assert!(text.contains("txp_request_duration_seconds_count 3"));
        assert!(
            text.contains("txp_request_duration_seconds_bucket{le=\"0.005\"} 2"),
            "{text}"
        );
        assert!(text.contains("txp_upstream_errors_total{kind=\"connect\"} 0"));
        assert!(text.contains("txp_exchange_cache_entries 0"));
    }

    #[test]
    fn a_request_aborted_before_any_status_is_counted_apart() {
        let m = Metrics::default();
        // Status 0: the access log's status of a request whose client went away first.
        for status in [0, 0, 100] {
            m.request(status, Duration::from_millis(3));
        }
        let text = m.render();
        for line in [
            "txp_requests_total{status=\"aborted\"} 2",
            "txp_requests_total{status=\"100\"} 1",
            "txp_request_duration_seconds_count 3",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line}: {text}");
        }
        assert_eq!(m.aborted_requests(), 2);
        assert_eq!(m.requests_with_status(100), 1);
    }
}
