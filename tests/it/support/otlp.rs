//! An OTLP/HTTP trace receiver on loopback: `POST /v1/traces` with a protobuf
//! `ExportTraceServiceRequest`, decoded with the official definitions (the `opentelemetry-proto`
//! crate, generated from opentelemetry-proto's `.proto` files). Keeps every span it receives.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use tokio::net::TcpListener;

/// One received span, with the resource it came with.
#[derive(Debug, Clone)]
pub struct Received {
    pub span: Span,
    pub resource: Vec<KeyValue>,
}

impl Received {
    /// Hex trace id, as in `traceparent`.
    pub fn trace_id(&self) -> String {
        hex(&self.span.trace_id)
    }

    pub fn span_id(&self) -> String {
        hex(&self.span.span_id)
    }

    pub fn parent_span_id(&self) -> String {
        hex(&self.span.parent_span_id)
    }

    /// The span's attributes, as text.
    pub fn attributes(&self) -> HashMap<String, String> {
        self.span
            .attributes
            .iter()
            .map(|kv| (kv.key.clone(), text(kv.value.as_ref())))
            .collect()
    }

    /// Every attribute value of the span and its resource, and its name, as text.
    pub fn all_text(&self) -> Vec<String> {
        let mut all: Vec<String> = self
            .span
            .attributes
            .iter()
            .chain(&self.resource)
            .flat_map(|kv| [kv.key.clone(), text(kv.value.as_ref())])
            .collect();
        all.push(self.span.name.clone());
        if let Some(status) = &self.span.status {
            all.push(status.message.clone());
        }
        all.extend(self.span.events.iter().map(|e| e.name.clone()));
        all.push(String::from_utf8_lossy(self.span.trace_state.as_bytes()).into_owned());
        all
    }
}

/// An attribute value as text (`AnyValue`'s string, integer or boolean).
pub fn text(value: Option<&AnyValue>) -> String {
    match value.and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        other => format!("{other:?}"),
    }
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The running receiver.
#[derive(Clone)]
pub struct Receiver {
    pub addr: SocketAddr,
    spans: Arc<Mutex<Vec<Received>>>,
    /// Export requests that did not decode.
    undecodable: Arc<Mutex<usize>>,
}

impl Receiver {
    /// Starts on 127.0.0.1:0.
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind OTLP receiver");
        let receiver = Self {
            addr: listener.local_addr().expect("addr"),
            spans: Arc::default(),
            undecodable: Arc::default(),
        };
        let r = receiver.clone();
        super::serve(listener, move |req| r.clone().handle(req));
        receiver
    }

    /// `http://127.0.0.1:PORT`: the base URL, as `telemetry.otlp_endpoint` takes it.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<Received> {
        self.spans.lock().expect("lock").clone()
    }

    /// The spans of trace `trace_id` (hex).
    pub fn trace(&self, trace_id: &str) -> Vec<Received> {
        self.spans()
            .into_iter()
            .filter(|s| s.trace_id() == trace_id)
            .collect()
    }

    pub fn undecodable(&self) -> usize {
        *self.undecodable.lock().expect("lock")
    }

    async fn handle(self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let protobuf = req
            .headers()
            .get(http::header::CONTENT_TYPE)
            .is_some_and(|v| v == "application/x-protobuf");
        if req.method() != http::Method::POST || req.uri().path() != "/v1/traces" || !protobuf {
            return answer(StatusCode::NOT_FOUND, Bytes::new());
        }
        let body = req
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let Ok(request) = ExportTraceServiceRequest::decode(body) else {
            *self.undecodable.lock().expect("lock") += 1;
            return answer(StatusCode::BAD_REQUEST, Bytes::new());
        };
        let mut spans = self.spans.lock().expect("lock");
        for rs in request.resource_spans {
            let resource = rs.resource.map(|r| r.attributes).unwrap_or_default();
            for ss in rs.scope_spans {
                for span in ss.spans {
                    spans.push(Received {
                        span,
                        resource: resource.clone(),
                    });
                }
            }
        }
        let ok = ExportTraceServiceResponse::default().encode_to_vec();
        answer(StatusCode::OK, ok.into())
    }
}

fn answer(status: StatusCode, body: Bytes) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/x-protobuf"),
    );
    resp
}
