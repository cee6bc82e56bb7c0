//! RFC 9728 OAuth 2.0 Protected Resource Metadata: the document, its URL, the resource
//! identifier that a request path belongs to, and [`ProtectedResourceLayer`], which serves the
//! document (README "HTTP behaviour").

use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::future::{Either as EitherFuture, MapOk, Ready, TryFutureExt, ready};
use http::uri::Authority;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::Full;
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

    /// The RFC 9728 metadata URL for a request to `uri` carrying `host` (put into every
    /// `WWW-Authenticate` challenge).
    pub fn metadata_url_for(&self, host: Option<&HeaderValue>, uri: &http::Uri) -> String {
        let base = Base::of(self.public_url.as_ref(), host, uri);
        metadata_url(&resource_for(&self.config, &base, uri.path()))
    }

    /// The metadata document for a request to the well-known path.
    pub fn document_for(&self, host: Option<&HeaderValue>, uri: &http::Uri) -> serde_json::Value {
        let base = Base::of(self.public_url.as_ref(), host, uri);
        document(&self.config, &base, uri.path())
    }

    /// `Bearer resource_metadata="…"`: the challenge that points a client at the metadata.
    pub fn challenge_for(&self, host: Option<&HeaderValue>, uri: &http::Uri) -> String {
        format!(
            "Bearer resource_metadata=\"{}\"",
            self.metadata_url_for(host, uri)
        )
    }
}

/// The well-known path of RFC 9728 §3.
pub const WELL_KNOWN: &str = "/.well-known/oauth-protected-resource";

/// Where clients reach the proxy: `public_url`, or `http://<Host>` without one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Base {
    /// `scheme://authority`.
    pub origin: String,
    /// The path of `public_url` without its trailing slash (`/tenant`), or empty.
    pub prefix: String,
}

impl Base {
    /// From `public_url` or, failing that, from the request's `Host` (plain http: without
    /// `public_url` the proxy cannot know the client's scheme).
    pub fn of(public_url: Option<&url::Url>, host: Option<&HeaderValue>, uri: &http::Uri) -> Self {
        if let Some(u) = public_url {
            return Self {
                origin: u.origin().ascii_serialization(),
                prefix: u.path().trim_end_matches('/').to_owned(),
            };
        }
        // A Host that is not a valid authority (an injection attempt) is not echoed.
        let host = host
            .and_then(|h| h.to_str().ok())
            .or_else(|| uri.authority().map(Authority::as_str))
            .and_then(|h| h.parse::<Authority>().ok())
            .filter(|a| {
                a.as_str()
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b))
            });
        Self {
            origin: match host {
                Some(a) => format!("http://{a}"),
                None => "http://localhost".to_owned(),
            },
            prefix: String::new(),
        }
    }
}

/// The resource identifier for a request to `path`: the configured one, else the base URL
/// plus the first path segment below it (`/mcp/x` → `https://host/tenant/mcp`, whether or
/// not the ingress kept the `/tenant` prefix on the way in).
pub fn resource_for(config: &ProtectedResource, base: &Base, path: &str) -> String {
    if let Some(r) = &config.resource {
        return r.clone();
    }
    let below = match path.strip_prefix(base.prefix.as_str()) {
        Some(rest) if !base.prefix.is_empty() && (rest.is_empty() || rest.starts_with('/')) => rest,
        _ => path,
    };
    let first = below
        .trim_start_matches('/')
        .split('/')
        .next()
        .unwrap_or("");
    if first.is_empty() {
        format!("{}{}", base.origin, base.prefix)
    } else {
        format!("{}{}/{first}", base.origin, base.prefix)
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
/// Its `resource` is the URL the well-known segment was inserted into (RFC 9728 §3.3 has the
/// client check exactly that): the origin plus the path after the segment.
pub fn document(config: &ProtectedResource, base: &Base, request_path: &str) -> serde_json::Value {
    let suffix = request_path.strip_prefix(WELL_KNOWN).unwrap_or("");
    let resource = match &config.resource {
        Some(r) => r.clone(),
        None => format!("{}{}", base.origin, suffix.trim_end_matches('/')),
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
            let doc = self
                .resource
                .document_for(req.headers().get(header::HOST), req.uri());
            let mut resp =
                Response::new(ResponseBody::own(Full::new(Bytes::from(doc.to_string()))));
            *resp.status_mut() = StatusCode::OK;
            let headers = resp.headers_mut();
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            // Public by definition: any page may read it, whatever `cors` allows.
            headers.insert(
                header::ACCESS_CONTROL_ALLOW_ORIGIN,
                HeaderValue::from_static("*"),
            );
            resp.extensions_mut().insert(Outcome::METADATA);
            return EitherFuture::Left(ready(Ok(resp)));
        }
        let passed: Passed<ResB> = |r| r.map(ResponseBody::inner);
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

    fn host_base(host: &str) -> Base {
        Base {
            origin: format!("http://{host}"),
            prefix: String::new(),
        }
    }

    #[test]
    fn resource_defaults_to_origin_and_first_segment() {
        let b = host_base("h:1");
        assert_eq!(resource_for(&pr(None), &b, "/mcp/x"), "http://h:1/mcp");
        assert_eq!(resource_for(&pr(None), &b, "/"), "http://h:1");
        assert_eq!(
            resource_for(&pr(Some("https://r/mcp")), &b, "/x"),
            "https://r/mcp"
        );
        let doc = document(&pr(None), &b, "/.well-known/oauth-protected-resource/mcp");
        assert_eq!(doc["resource"], "http://h:1/mcp");
        assert_eq!(doc["authorization_servers"][0], "https://idp.example.com");
    }

    #[test]
    fn a_public_url_with_a_path_is_one_resource_and_one_metadata_url() {
        let public: url::Url = "https://h.example/tenant/".parse().expect("url");
        let b = Base::of(Some(&public), None, &http::Uri::from_static("/"));
        assert_eq!(b.origin, "https://h.example");
        assert_eq!(b.prefix, "/tenant");
        for path in ["/mcp", "/mcp/x", "/tenant/mcp", "/tenant/mcp/x"] {
            let resource = resource_for(&pr(None), &b, path);
            assert_eq!(resource, "https://h.example/tenant/mcp", "{path}");
            let url = metadata_url(&resource);
            assert_eq!(
                url,
                "https://h.example/.well-known/oauth-protected-resource/tenant/mcp"
            );
            // The document at that URL names the same resource (RFC 9728 §3.3).
            let served_at = url.strip_prefix("https://h.example").expect("same origin");
            assert_eq!(document(&pr(None), &b, served_at)["resource"], resource);
        }
        // `/tenantx` is not under `/tenant`.
        assert_eq!(
            resource_for(&pr(None), &b, "/tenantx/y"),
            "https://h.example/tenant/tenantx"
        );
    }

    #[test]
    fn a_hostile_host_is_not_echoed() {
        let uri = http::Uri::from_static("/");
        let evil = http::HeaderValue::from_static("evil\"x");
        assert_eq!(Base::of(None, Some(&evil), &uri).origin, "http://localhost");
        let good = http::HeaderValue::from_static("127.0.0.1:8080");
        assert_eq!(
            Base::of(None, Some(&good), &uri).origin,
            "http://127.0.0.1:8080"
        );
    }
}
