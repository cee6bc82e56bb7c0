use super::*;

#[test]
fn traces_go_under_the_endpoints_own_path() {
    let url = |s: &str| url::Url::parse(s).expect("URL");
    assert_eq!(
        traces_url(&url("http://127.0.0.1:4318")),
        "http://127.0.0.1:4318/v1/traces"
    );
    assert_eq!(
        traces_url(&url("https://otel.example/collector/")),
        "https://otel.example/collector/v1/traces"
    );
    assert_eq!(
        traces_url(&url("https://otel.example/collector")),
        "https://otel.example/collector/v1/traces"
    );
}

#[test]
fn unknown_methods_are_reported_as_other() {
    assert_eq!(method_name(&Method::POST), "POST");
    let odd = Method::from_bytes(b"PROPFIND").expect("method");
    assert_eq!(method_name(&odd), "_OTHER");
}

#[test]
fn refusals_are_named_by_fixed_labels() {
    use crate::metrics::{RejectReason, UpstreamErrorKind};
    let rejected = Denial::Inbound(InboundError::Rejected {
        reason: RejectReason::Expired,
        description: "token expired",
    });
    assert_eq!(denial_kind(&rejected), "expired");
    assert_eq!(denial_kind(&Denial::MissingToken), "missing");
    assert_eq!(
        denial_kind(&Denial::Exchange(ExchangeError::ClientRejected)),
        "client_error"
    );
    assert_eq!(
        denial_kind(&Denial::Upstream(UpstreamErrorKind::Timeout)),
        "timeout"
    );
}

/// A span as the SDK hands it to a processor.
fn finished_span() -> SpanData {
    use opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceId, TraceState};
    SpanData {
        span_context: SpanContext::new(
            TraceId::from(1),
            SpanId::from(1),
            TraceFlags::SAMPLED,
            false,
            TraceState::default(),
        ),
        parent_span_id: SpanId::INVALID,
        parent_span_is_remote: false,
        span_kind: SpanKind::Internal,
        name: "test".into(),
        start_time: std::time::SystemTime::now(),
        end_time: std::time::SystemTime::now(),
        attributes: Vec::new(),
        dropped_attributes_count: 0,
        events: Default::default(),
        links: Default::default(),
        status: Status::Unset,
        instrumentation_scope: Default::default(),
    }
}

#[test]
fn a_full_queue_drops_and_counts_instead_of_waiting() {
    let metrics = Arc::new(Metrics::default());
    let (queue, mut rx) = mpsc::channel(2);
    let batcher = Batcher {
        queue,
        metrics: metrics.clone(),
    };
    for _ in 0..5 {
        batcher.on_end(finished_span());
    }
    assert_eq!(metrics.spans_dropped.get(SpanDrop::QueueFull), 3);
    let mut queued = 0;
    while rx.try_recv().is_ok() {
        queued += 1;
    }
    assert_eq!(queued, 2);
    // Nobody takes spans any more: still no waiting, still counted.
    drop(rx);
    batcher.on_end(finished_span());
    assert_eq!(metrics.spans_dropped.get(SpanDrop::QueueFull), 4);
}

#[tokio::test]
async fn without_an_endpoint_there_is_no_tracer() {
    let config = config::Telemetry {
        otlp_endpoint: None,
        service_name: "x".into(),
        sample_ratio: 1.0,
    };
    let telemetry = Telemetry::start(&config, &[], Arc::new(Metrics::default())).expect("starts");
    assert!(telemetry.is_none());
}

/// With traces off, every request future holds an `Option<ChildSpan>` that is `None`: it must
/// cost those futures a pointer's worth of room, not an SDK span's.
#[test]
fn a_child_span_is_small_where_it_is_held() {
    assert!(
        std::mem::size_of::<Option<ChildSpan>>() <= 2 * std::mem::size_of::<usize>(),
        "Option<ChildSpan> is {} bytes",
        std::mem::size_of::<Option<ChildSpan>>()
    );
}
