//! RFC 9728 OAuth 2.0 Protected Resource Metadata: the document, its URL, and the resource
//! identifier that a request path belongs to.

use http::HeaderMap;
use http::uri::Authority;

use crate::config::ProtectedResource;

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
