//! The token request: an application/x-www-form-urlencoded POST to the token endpoint, either
//! a token exchange (RFC 8693 §2.1) or Microsoft Entra ID's On-Behalf-Of request (the JWT
//! bearer grant of RFC 7523 §2.1 with `requested_token_use=on_behalf_of`).
//!
//! Every parameter that depends only on the configuration is encoded once, at start-up, into a
//! `FormTemplate`; a request appends the subject token and the client credentials.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, StatusCode, header};
use secrecy::{ExposeSecret, SecretString};
use url::Url;
use url::form_urlencoded::Serializer;

use crate::config::{Exchange, Grant};
use crate::idp::{self, IdpError};

/// RFC 8693 §2.1: the `grant_type` of a token exchange.
pub const TOKEN_EXCHANGE_GRANT_TYPE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";

/// RFC 7523 §2.1: the `grant_type` of Entra's On-Behalf-Of request.
pub const JWT_BEARER_GRANT_TYPE: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";

/// The `grant_type` that `grant` sends.
pub fn grant_type(grant: Grant) -> &'static str {
    match grant {
        Grant::TokenExchange => TOKEN_EXCHANGE_GRANT_TYPE,
        Grant::JwtBearerObo => JWT_BEARER_GRANT_TYPE,
    }
}

/// The configuration-dependent part of the form, already encoded.
#[derive(Debug, Clone)]
pub(crate) struct FormTemplate {
    fixed: String,
    /// The parameter that carries the client's token: `subject_token`, or `assertion`.
    subject_field: &'static str,
}

impl FormTemplate {
    /// Token exchange: `grant_type`, `subject_token_type`, `requested_token_type`, each
    /// `audience` and `resource` as its own parameter (RFC 8693 §2.1), `scope`.
    /// On-Behalf-Of: `grant_type`, `requested_token_use=on_behalf_of`, `scope`.
    /// Then `extra_params` (config validation keeps them from overriding any of these).
    pub(crate) fn new(config: &Exchange) -> Self {
        let mut form = Serializer::new(String::new());
        form.append_pair("grant_type", grant_type(config.grant));
        let subject_field = match config.grant {
            Grant::TokenExchange => {
                form.append_pair("subject_token_type", &config.subject_token_type);
                form.append_pair("requested_token_type", &config.requested_token_type);
                for a in &config.audience {
                    form.append_pair("audience", a);
                }
                for r in &config.resource {
                    form.append_pair("resource", r);
                }
                "subject_token"
            }
            Grant::JwtBearerObo => {
                form.append_pair("requested_token_use", "on_behalf_of");
                "assertion"
            }
        };
        if let Some(scope) = &config.scope {
            form.append_pair("scope", scope);
        }
        for (k, v) in &config.extra_params {
            form.append_pair(k, v);
        }
        Self {
            fixed: form.finish(),
            subject_field,
        }
    }

    /// The full body: the template, `subject_token`, and the credential parameters.
    pub(crate) fn body(
        &self,
        subject: &str,
        credentials: &[(&'static str, SecretString)],
    ) -> String {
        let mut target = String::with_capacity(self.fixed.len() + subject.len() * 3 / 2 + 1024);
        target.push_str(&self.fixed);
        let mut form = Serializer::for_suffix(target, 0);
        form.append_pair(self.subject_field, subject);
        for (k, v) in credentials {
            form.append_pair(k, v.expose_secret());
        }
        form.finish()
    }
}

/// The token endpoint's answer.
pub(crate) struct Answer {
    pub(crate) status: StatusCode,
    pub(crate) retry_after: Option<HeaderValue>,
    /// `None` when the body exceeded [`idp::MAX_RESPONSE_BYTES`].
    pub(crate) body: Option<Bytes>,
}

/// POSTs `body` to `endpoint`; the whole exchange (connect, headers, body) within `timeout`.
/// `propagation`: trace context fields to send along (`traceparent`, README "Traces").
/// Transport errors and the timeout are `Err`; any HTTP answer is `Ok`.
pub(crate) async fn post(
    http: &reqwest::Client,
    endpoint: &Url,
    body: String,
    authorization: Option<HeaderValue>,
    propagation: Option<&http::HeaderMap>,
    timeout: Duration,
) -> Result<Answer, IdpError> {
    let call = async {
        let mut request = http
            .post(endpoint.clone())
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header(header::ACCEPT, "application/json")
            .timeout(timeout)
            .body(body);
        if let Some(value) = authorization {
            request = request.header(header::AUTHORIZATION, value);
        }
        if let Some(fields) = propagation {
            request = request.headers(fields.clone());
        }
        let response = request.send().await.map_err(|e| {
            if e.is_timeout() {
                IdpError::Timeout
            } else {
                IdpError::Transport(e)
            }
        })?;
        let status = response.status();
        let retry_after = response.headers().get(header::RETRY_AFTER).cloned();
        let body = match idp::read_limited(response).await {
            Ok(b) => Some(b),
            Err(IdpError::TooLarge) => None,
            Err(e) => return Err(e),
        };
        Ok(Answer {
            status,
            retry_after,
            body,
        })
    };
    tokio::time::timeout(timeout, call)
        .await
        .unwrap_or(Err(IdpError::Timeout))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::config::{ACCESS_TOKEN_TYPE, ClientAuth};

    /// The smallest exchange section: a public client `txp`, every list empty.
    fn minimal(grant: Grant, scope: Option<&str>) -> Exchange {
        Exchange {
            grant,
            token_endpoint: None,
            issuer: "https://idp.example.com".into(),
            client_id: "txp".into(),
            client_auth: ClientAuth::None,
            audience: vec![],
            resource: vec![],
            scope: scope.map(str::to_owned),
            subject_token_type: ACCESS_TOKEN_TYPE.into(),
            requested_token_type: ACCESS_TOKEN_TYPE.into(),
            extra_params: BTreeMap::new(),
            timeout: Duration::from_secs(5),
            max_concurrent: 64,
            negative_ttl: Duration::from_secs(10),
            verify_issued: crate::config::VerifyIssued::Auto,
        }
    }

    fn pairs(body: &str) -> Vec<(String, String)> {
        url::form_urlencoded::parse(body.as_bytes())
            .into_owned()
            .collect()
    }

    #[test]
    fn the_form_carries_every_parameter_each_list_item_repeated() {
        let config = Exchange {
            grant: crate::config::Grant::TokenExchange,
            token_endpoint: None,
            issuer: "https://idp.example.com".into(),
            client_id: "txp".into(),
            client_auth: ClientAuth::None,
            audience: vec!["nextcloud".into(), "calendar".into()],
            resource: vec![
                "https://a.example.com/".into(),
                "https://b.example.com/x?y=1".into(),
            ],
            scope: Some("openid notes.read".into()),
            subject_token_type: ACCESS_TOKEN_TYPE.into(),
            requested_token_type: "urn:ietf:params:oauth:token-type:jwt".into(),
            extra_params: BTreeMap::from([("tenant".to_string(), "a&b=c".to_string())]),
            timeout: Duration::from_secs(5),
            max_concurrent: 64,
            negative_ttl: Duration::from_secs(10),
            verify_issued: crate::config::VerifyIssued::Auto,
        };
        let form = FormTemplate::new(&config);
        let body = form.body(
            "sub+ject/token=",
            &[("client_id", SecretString::from("txp"))],
        );
        let got = pairs(&body);
        let want: Vec<(String, String)> = [
            ("grant_type", TOKEN_EXCHANGE_GRANT_TYPE),
            ("subject_token_type", ACCESS_TOKEN_TYPE),
            (
                "requested_token_type",
                "urn:ietf:params:oauth:token-type:jwt",
            ),
            ("audience", "nextcloud"),
            ("audience", "calendar"),
            ("resource", "https://a.example.com/"),
            ("resource", "https://b.example.com/x?y=1"),
            ("scope", "openid notes.read"),
            ("tenant", "a&b=c"),
            ("subject_token", "sub+ject/token="),
            ("client_id", "txp"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn a_minimal_form_has_no_empty_parameters() {
        let config = minimal(Grant::TokenExchange, None);
        let body = FormTemplate::new(&config).body("t", &[]);
        let keys: Vec<String> = pairs(&body).into_iter().map(|(k, _)| k).collect();
        assert_eq!(
            keys,
            [
                "grant_type",
                "subject_token_type",
                "requested_token_type",
                "subject_token"
            ]
        );
    }

    #[test]
    fn the_on_behalf_of_form_is_entras() {
        let config = minimal(Grant::JwtBearerObo, Some("api://backend/.default"));
        let body = FormTemplate::new(&config)
            .body("eyJ.a.b", &[("client_id", SecretString::from("proxy-app"))]);
        let want: Vec<(String, String)> = [
            ("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer"),
            ("requested_token_use", "on_behalf_of"),
            ("scope", "api://backend/.default"),
            ("assertion", "eyJ.a.b"),
            ("client_id", "proxy-app"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        assert_eq!(pairs(&body), want);
    }
}
