//! RFC 9728 OAuth 2.0 Protected Resource Metadata: the document, its URL, the resource
//! identifier that a request path belongs to, and [`ProtectedResourceLayer`], which serves the
//! document (README "HTTP behaviour").

use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::future::{Either as EitherFuture, MapOk, Ready, TryFutureExt, ready};
use http::uri::Authority;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{Either, Full};
use tower::{Layer, Service};

use crate::config::ProtectedResource;
use crate::response::{Outcome, ResponseBody};

/// Where the proxy is reached and what it protects: everything a challenge or the metadata
/// document needs to name the resource (`public_url` and `protected_resource`).
#[derive(Debug, Clone)]
pub struct Resource {
    /// `public_url`, when configured.
    pub public_url: Option<url::Url>,
    /// `protected_resource.*`.
    pub config: ProtectedResource,
}

impl Resource {
    /// Settings from the validated configuration.
    pub fn from_config(config: &crate::config::Config) -> Self {
        Self {
            public_url: config.public_url.clone(),
            config: config.protected_resource.clone(),
        }
    }

    /// The RFC 9728 metadata URL for a request (put into every `WWW-Authenticate` challenge).
    pub fn metadata_url_for(&self, headers: &HeaderMap, uri: &http::Uri) -> String {
        let origin = origin(self.public_url.as_ref(), headers, uri);
        metadata_url(&resource_for(&self.config, &origin, uri.path()))
    }

    /// The metadata document for a request to the well-known path.
    pub fn document_for(&self, headers: &HeaderMap, uri: &http::Uri) -> serde_json::Value {
        let origin = origin(self.public_url.as_ref(), headers, uri);
        document(&self.config, &origin, uri.path())
    }
}

/// The well-known path of RFC 9728 §3.
pub const WELL_KNOWN: &str = "/.well-known/oauth-protected-resource";

/// The proxy's public origin (`https://mcp.example.com`), from `public_url` or, failing that,
/// from the request's `Host` (plain http: the proxy itself does not terminate TLS).
pub fn origin(public_url: Option<&url::Url>, headers: &HeaderMap, uri: &http::Uri) -> String {
    if let Some(u) = public_url {
        return u.as_str().trim_end_matches('/').to_owned();
    }
    // A Host that is not a valid authority (an injection attempt) is not echoed.
    let host = headers
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| uri.authority().map(Authority::as_str))
        .and_then(|h| h.parse::<Authority>().ok())
        .filter(|a| {
            a.as_str()
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b))
        });
    match host {
        Some(a) => format!("http://{a}"),
        None => "http://localhost".to_owned(),
    }
}

/// The resource identifier for a request to `path`: the configured one, else the origin plus
/// the first path segment (`/mcp/x` → `https://host/mcp`).
pub fn resource_for(config: &ProtectedResource, origin: &str, path: &str) -> String {
    if let Some(r) = &config.resource {
        return r.clone();
    }
    let first = path.trim_start_matches('/').split('/').next().unwrap_or("");
    if first.is_empty() {
        origin.to_owned()
    } else {
        format!("{origin}/{first}")
    }
}

/// The metadata URL for `resource` (RFC 9728 §3.1: the well-known path is inserted between
/// the authority and the resource's path).
pub fn metadata_url(resource: &str) -> String {
    match url::Url::parse(resource) {
        Ok(u) => {
            let path = u.path().trim_end_matches('/');
            let mut origin = u.origin().ascii_serialization();
            origin.push_str(WELL_KNOWN);
            origin.push_str(path);
            origin
        }
        Err(_) => format!("{}{WELL_KNOWN}", resource.trim_end_matches('/')),
    }
}

/// The metadata document served at `request_path` (`/.well-known/oauth-protected-resource[/…]`).
pub fn document(config: &ProtectedResource, origin: &str, request_path: &str) -> serde_json::Value {
    let suffix = request_path.strip_prefix(WELL_KNOWN).unwrap_or("");
    let resource = match &config.resource {
        Some(r) => r.clone(),
        None => format!("{origin}{}", suffix.trim_end_matches('/')),
    };
    let mut doc = serde_json::json!({
        "resource": resource,
        "authorization_servers": config.authorization_servers,
        "bearer_methods_supported": ["header"],
    });
    if !config.scopes_supported.is_empty() {
        doc["scopes_supported"] = serde_json::json!(config.scopes_supported);
    }
    doc
}

/// True for the metadata endpoint and its path-suffixed variants.
pub fn is_metadata_path(path: &str) -> bool {
    path == WELL_KNOWN
        || path
            .strip_prefix(WELL_KNOWN)
            .is_some_and(|rest| rest.starts_with('/'))
}

/// Answers `GET`/`HEAD` for the RFC 9728 metadata document (§3: the well-known path, and the
/// same with the resource's path appended) without a token; every other request goes on to
/// the inner service untouched.
#[derive(Debug, Clone)]
pub struct ProtectedResourceLayer {
    resource: Arc<Resource>,
}

impl ProtectedResourceLayer {
    /// Serves the metadata of `resource`.
    pub fn new(resource: Arc<Resource>) -> Self {
        Self { resource }
    }
}

impl<S> Layer<S> for ProtectedResourceLayer {
    type Service = ProtectedResourceService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ProtectedResourceService {
            inner,
            resource: self.resource.clone(),
        }
    }
}

/// The service of [`ProtectedResourceLayer`].
#[derive(Debug, Clone)]
pub struct ProtectedResourceService<S> {
    inner: S,
    resource: Arc<Resource>,
}

type Passed<B> = fn(Response<B>) -> Response<ResponseBody<B>>;

impl<S, ReqB, ResB> Service<Request<ReqB>> for ProtectedResourceService<S>
where
    S: Service<Request<ReqB>, Response = Response<ResB>>,
{
    type Response = Response<ResponseBody<ResB>>;
    type Error = S::Error;
    type Future =
        EitherFuture<Ready<Result<Self::Response, S::Error>>, MapOk<S::Future, Passed<ResB>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqB>) -> Self::Future {
        if is_metadata_path(req.uri().path()) && matches!(*req.method(), Method::GET | Method::HEAD)
        {
            let doc = self.resource.document_for(req.headers(), req.uri());
            let mut resp = Response::new(Either::Right(Full::new(Bytes::from(doc.to_string()))));
            *resp.status_mut() = StatusCode::OK;
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            resp.extensions_mut().insert(Outcome::METADATA);
            return EitherFuture::Left(ready(Ok(resp)));
        }
        let passed: Passed<ResB> = |r| r.map(Either::Left);
        EitherFuture::Right(self.inner.call(req).map_ok(passed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pr(resource: Option<&str>) -> ProtectedResource {
        ProtectedResource {
            resource: resource.map(String::from),
            authorization_servers: vec!["https://idp.example.com".into()],
            scopes_supported: vec![],
        }
    }

    #[test]
    fn metadata_url_inserts_the_well_known_path() {
        assert_eq!(
            metadata_url("https://mcp.example.com/mcp"),
            "https://mcp.example.com/.well-known/oauth-protected-resource/mcp"
        );
        assert_eq!(
            metadata_url("https://mcp.example.com"),
            "https://mcp.example.com/.well-known/oauth-protected-resource"
        );
    }

    #[test]
    fn resource_defaults_to_origin_and_first_segment() {
        assert_eq!(
            resource_for(&pr(None), "http://h:1", "/mcp/x"),
            "http://h:1/mcp"
        );
        assert_eq!(resource_for(&pr(None), "http://h:1", "/"), "http://h:1");
        assert_eq!(
            resource_for(&pr(Some("https://r/mcp")), "http://h:1", "/x"),
            "https://r/mcp"
        );
        let doc = document(
            &pr(None),
            "http://h:1",
            "/.well-known/oauth-protected-resource/mcp",
        );
        assert_eq!(doc["resource"], "http://h:1/mcp");
        assert_eq!(doc["authorization_servers"][0], "https://idp.example.com");
    }

    #[test]
    fn a_hostile_host_is_not_echoed() {
        let mut h = HeaderMap::new();
        h.insert(
            http::header::HOST,
            http::HeaderValue::from_static("evil\"x"),
        );
        assert_eq!(
            origin(None, &h, &http::Uri::from_static("/")),
            "http://localhost"
        );
        h.insert(
            http::header::HOST,
            http::HeaderValue::from_static("127.0.0.1:8080"),
        );
        assert_eq!(
            origin(None, &h, &http::Uri::from_static("/")),
            "http://127.0.0.1:8080"
        );
    }
}
