//! The HTTP client for every call to the identity provider (discovery, JWKS, token exchange,
//! introspection) and OAuth/OIDC discovery.
//!
//! One client, configured once from `idp_tls`: extra trust anchors from `idp_tls.ca_file`,
//! no redirects (a redirect could send a client credential elsewhere), no proxy from the
//! environment, bounded connect time, and a cap on how much of a response is read.

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use bytes::{Bytes, BytesMut};
use http::HeaderValue;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use url::Url;

use crate::config::{self, IdpTls};

/// No legitimate discovery document, JWKS or token response comes near this size.
pub const MAX_RESPONSE_BYTES: usize = 1024 * 1024;
/// Connecting to the IdP takes milliseconds when it is up.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Default bound on a whole discovery or JWKS request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a call to the IdP failed. The messages never contain response bodies or credentials.
#[derive(Debug, thiserror::Error)]
pub enum IdpError {
    #[error("cannot build the IdP client: {0}")]
    Setup(String),
    #[error("request to the IdP failed")]
    Transport(#[source] reqwest::Error),
    #[error("the IdP did not answer in time")]
    Timeout,
    #[error("the IdP answered HTTP {0}")]
    Status(u16),
    #[error("the IdP's response exceeds {MAX_RESPONSE_BYTES} bytes")]
    TooLarge,
    #[error("the IdP's response is not the expected JSON")]
    Json(#[source] serde_json::Error),
    #[error("{0}")]
    Invalid(&'static str),
}

impl IdpError {
    fn from_reqwest(e: reqwest::Error) -> Self {
        if e.is_timeout() {
            IdpError::Timeout
        } else {
            IdpError::Transport(e)
        }
    }
}

/// A configured client for IdP calls; cheap to clone.
#[derive(Clone, Debug)]
pub struct IdpClient {
    http: reqwest::Client,
    allow_plain_http: bool,
}

impl IdpClient {
    /// Builds the client from `idp_tls`. Reads `ca_file` once, now.
    pub fn new(tls: &IdpTls) -> Result<Self, IdpError> {
        let mut builder = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(REQUEST_TIMEOUT)
            .pool_idle_timeout(Duration::from_secs(60))
            .user_agent(concat!("token-exchange-proxy/", env!("CARGO_PKG_VERSION")));
        if let Some(path) = &tls.ca_file {
            let pem = std::fs::read(path).map_err(|e| {
                IdpError::Setup(format!("idp_tls.ca_file {}: {}", path.display(), e.kind()))
            })?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|_| {
                IdpError::Setup("idp_tls.ca_file: not a PEM certificate bundle".into())
            })?;
            if certs.is_empty() {
                return Err(IdpError::Setup(
                    "idp_tls.ca_file: no certificate in the file".into(),
                ));
            }
            builder = builder.tls_certs_merge(certs);
        }
        let http = builder
            .build()
            .map_err(|e| IdpError::Setup(e.to_string()))?;
        Ok(Self {
            http,
            allow_plain_http: tls.allow_plain_http,
        })
    }

    /// The underlying client, for requests that need more than [`IdpClient::get_json`].
    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    /// Refuses plain http to anything but loopback unless `idp_tls.allow_plain_http`.
    pub fn check_url(&self, url: &Url) -> Result<(), IdpError> {
        match url.scheme() {
            "https" => Ok(()),
            "http" if self.allow_plain_http || config::is_loopback(url) => Ok(()),
            _ => Err(IdpError::Invalid(
                "IdP URL must be https (idp_tls.allow_plain_http is off)",
            )),
        }
    }

    /// GETs `url` and parses a JSON body of at most [`MAX_RESPONSE_BYTES`]; returns the
    /// value and the response headers.
    pub async fn get_json<T: for<'de> Deserialize<'de>>(
        &self,
        url: &Url,
    ) -> Result<(T, reqwest::header::HeaderMap), IdpError> {
        self.check_url(url)?;
        let resp = self
            .http
            .get(url.clone())
            .header(reqwest::header::ACCEPT, "application/json")
            .send()
            .await
            .map_err(IdpError::from_reqwest)?;
        let status = resp.status();
        if !status.is_success() {
            return Err(IdpError::Status(status.as_u16()));
        }
        let headers = resp.headers().clone();
        let body = read_limited(resp).await?;
        let value = serde_json::from_slice(&body).map_err(IdpError::Json)?;
        Ok((value, headers))
    }
}

/// `Authorization: Basic …` for `client_secret_basic` (RFC 6749 §2.3.1 with RFC 7617), at the
/// token endpoint and the introspection endpoint alike: the client id and the secret are each
/// application/x-www-form-urlencoded (RFC 6749 Appendix B) before they are joined by `:` and
/// Base64-encoded, so a `:` or `%` in either survives. Marked sensitive.
pub(crate) fn basic_authorization(client_id: &str, secret: &SecretString) -> HeaderValue {
    let enc = |s: &str| url::form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
    let pair = format!("{}:{}", enc(client_id), enc(secret.expose_secret()));
    // Base64 is visible ASCII, so the value is always a valid header; the fallback (no
    // credentials, which the IdP answers 401) is never taken.
    let mut value = HeaderValue::try_from(format!("Basic {}", STANDARD.encode(pair)))
        .unwrap_or_else(|_| HeaderValue::from_static("Basic"));
    value.set_sensitive(true);
    value
}

/// Reads a response body, refusing more than [`MAX_RESPONSE_BYTES`].
pub async fn read_limited(mut resp: reqwest::Response) -> Result<Bytes, IdpError> {
    if resp
        .content_length()
        .is_some_and(|n| n > MAX_RESPONSE_BYTES as u64)
    {
        return Err(IdpError::TooLarge);
    }
    let mut buf = BytesMut::new();
    while let Some(chunk) = resp.chunk().await.map_err(IdpError::from_reqwest)? {
        if buf.len() + chunk.len() > MAX_RESPONSE_BYTES {
            return Err(IdpError::TooLarge);
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf.freeze())
}

/// The parts of OIDC discovery / RFC 8414 metadata the proxy uses.
#[derive(Debug, Clone, Deserialize)]
pub struct ServerMetadata {
    pub issuer: String,
    #[serde(default)]
    pub jwks_uri: Option<Url>,
    #[serde(default)]
    pub token_endpoint: Option<Url>,
    #[serde(default)]
    pub introspection_endpoint: Option<Url>,
    /// RFC 8414 §2: the grants the server supports, when it says.
    #[serde(default)]
    pub grant_types_supported: Option<Vec<String>>,
}

/// The discovery URLs to try for `issuer`, in order: OIDC (issuer + path), then RFC 8414 §3.1
/// (well-known inserted before the issuer's path), then RFC 8414 appended as some servers do.
pub fn discovery_urls(issuer: &str) -> Result<Vec<Url>, IdpError> {
    let base = Url::parse(issuer).map_err(|_| IdpError::Invalid("issuer is not a URL"))?;
    let trimmed = issuer.trim_end_matches('/');
    let path = base.path().trim_end_matches('/');
    let mut urls = Vec::with_capacity(3);
    let oidc = format!("{trimmed}/.well-known/openid-configuration");
    let mut inserted = base.clone();
    inserted.set_path(&format!("/.well-known/oauth-authorization-server{path}"));
    let appended = format!("{trimmed}/.well-known/oauth-authorization-server");
    for u in [Url::parse(&oidc), Ok(inserted), Url::parse(&appended)] {
        let u = u.map_err(|_| IdpError::Invalid("issuer is not a URL"))?;
        if !urls.contains(&u) {
            urls.push(u);
        }
    }
    Ok(urls)
}

/// Fetches the metadata of `issuer` (from `discovery_url` when given) and checks that the
/// document names the same issuer (OIDC Discovery §4.3, RFC 8414 §3.3).
pub async fn discover(
    client: &IdpClient,
    issuer: &str,
    discovery_url: Option<&Url>,
) -> Result<ServerMetadata, IdpError> {
    let candidates = match discovery_url {
        Some(u) => vec![u.clone()],
        None => discovery_urls(issuer)?,
    };
    let mut last = IdpError::Invalid("no discovery URL");
    for url in candidates {
        match client.get_json::<ServerMetadata>(&url).await {
            Ok((meta, _)) => {
                if meta.issuer != issuer {
                    return Err(IdpError::Invalid(
                        "the discovery document names a different issuer",
                    ));
                }
                for u in [
                    &meta.jwks_uri,
                    &meta.token_endpoint,
                    &meta.introspection_endpoint,
                ]
                .into_iter()
                .flatten()
                {
                    client.check_url(u)?;
                }
                return Ok(meta);
            }
            // Not there: try the next well-known location.
            Err(e @ IdpError::Status(404 | 405 | 400)) => last = e,
            Err(e) => return Err(e),
        }
    }
    Err(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn discovery_urls_follow_oidc_then_rfc8414() {
        let urls = discovery_urls("https://idp.example.com/realms/mcp").expect("valid");
        let urls: Vec<&str> = urls.iter().map(Url::as_str).collect();
        assert_eq!(
            urls,
            vec![
                "https://idp.example.com/realms/mcp/.well-known/openid-configuration",
                "https://idp.example.com/.well-known/oauth-authorization-server/realms/mcp",
                "https://idp.example.com/realms/mcp/.well-known/oauth-authorization-server",
            ]
        );
        let urls = discovery_urls("http://127.0.0.1:9000").expect("valid");
        assert_eq!(urls.len(), 2);
        assert_eq!(
            urls[1].as_str(),
            "http://127.0.0.1:9000/.well-known/oauth-authorization-server"
        );
    }

    /// The credentials inside a `Basic` header value.
    fn decode_basic(value: &HeaderValue) -> String {
        let b64 = value
            .to_str()
            .expect("ascii")
            .strip_prefix("Basic ")
            .expect("basic");
        String::from_utf8(STANDARD.decode(b64).expect("base64")).expect("utf8")
    }

    #[test]
    fn basic_credentials_are_form_encoded_before_base64() {
        let v = basic_authorization("my client:1", &SecretString::from("p@ss:w%rd+ /é"));
        assert!(v.is_sensitive());
        assert_eq!(
            decode_basic(&v),
            "my+client%3A1:p%40ss%3Aw%25rd%2B+%2F%C3%A9"
        );
        // Only the first ':' separates id from secret after decoding.
        let decoded = decode_basic(&v);
        let (id, secret) = decoded.split_once(':').expect("colon");
        let unenc = |s: &str| {
            url::form_urlencoded::parse(format!("x={s}").as_bytes())
                .next()
                .expect("pair")
                .1
                .into_owned()
        };
        assert_eq!(unenc(id), "my client:1");
        assert_eq!(unenc(secret), "p@ss:w%rd+ /é");
    }

    #[test]
    fn plain_ids_and_secrets_are_unchanged() {
        let v = basic_authorization("txp", &SecretString::from("s3cr3t"));
        assert_eq!(
            v,
            format!("Basic {}", STANDARD.encode("txp:s3cr3t")).as_str()
        );
    }

    #[test]
    fn plain_http_only_to_loopback_unless_allowed() {
        let strict = IdpClient::new(&IdpTls {
            ca_file: None,
            allow_plain_http: false,
        })
        .expect("client");
        let lax = IdpClient::new(&IdpTls {
            ca_file: None,
            allow_plain_http: true,
        })
        .expect("client");
        let remote = Url::parse("http://idp.example.com/jwks").expect("url");
        assert!(strict.check_url(&remote).is_err());
        assert!(lax.check_url(&remote).is_ok());
        assert!(
            strict
                .check_url(&Url::parse("http://127.0.0.1:1/x").expect("url"))
                .is_ok()
        );
        assert!(
            strict
                .check_url(&Url::parse("https://idp.example.com/x").expect("url"))
                .is_ok()
        );
    }
}
