//! Header rules for forwarding (RFC 9110 §7.6.1 hop-by-hop fields, `X-Forwarded-*`).
//!
//! Pure functions over [`HeaderMap`]s, so that the rules can be tested exhaustively.

use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// Fields that are hop-by-hop whether or not `Connection` names them (RFC 9110 §7.6.1, plus
/// the legacy `Keep-Alive` and `Proxy-Connection`).
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// `X-Forwarded-For`, `-Proto`, `-Host` (de facto standard, as set by most proxies).
pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Forwarding headers that pass only from a trusted proxy (`trusted_proxies`); from anyone
/// else they are removed, so that a backend that believes them cannot be lied to.
const FROM_TRUSTED_ONLY: [HeaderName; 4] = [
    HeaderName::from_static("forwarded"),
    HeaderName::from_static("x-real-ip"),
    HeaderName::from_static("x-forwarded-port"),
    HeaderName::from_static("x-forwarded-prefix"),
];

/// The peer of a connection: its address, with its `X-Forwarded-For` form made once per
/// connection, and whether it is one of `trusted_proxies`.
#[derive(Debug, Clone)]
pub struct ClientIp {
    ip: IpAddr,
    header: Option<HeaderValue>,
    trusted: bool,
}

impl ClientIp {
    /// The peer at `ip` (an IPv4 address mapped into IPv6 counts as the IPv4 one), trusted
    /// when it falls in one of `trusted_proxies`.
    pub fn new(ip: IpAddr, trusted_proxies: &[ipnet::IpNet]) -> Self {
        let ip = ip.to_canonical();
        Self {
            ip,
            header: HeaderValue::from_str(&ip.to_string()).ok(),
            trusted: trusted_proxies.iter().any(|net| net.contains(&ip)),
        }
    }

    /// Whether the peer's forwarding headers are kept.
    pub fn is_trusted(&self) -> bool {
        self.trusted
    }
}

/// Removes every hop-by-hop field: the fixed list and every name listed in *any* `Connection`
/// field (all values, not only the first header).
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none: one pass over the names instead of a removal per name.
    if !headers.keys().any(|name| HOP_BY_HOP.contains(name)) {
        return;
    }
    if !headers.contains_key(header::CONNECTION) {
        for name in &HOP_BY_HOP {
            headers.remove(name);
        }
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
}

/// Prepares request headers for the backend: removes hop-by-hop fields and
/// `Proxy-Authorization`, sets `Host` and `X-Forwarded-*`. `Authorization` is the layers'
/// business (the exchanged token, the validated client token, or none) and is left as it is.
///
/// From a trusted peer, `X-Forwarded-For` is appended to and the other forwarding headers pass
/// (`X-Forwarded-Proto` and `-Host` are set only when absent). From any other peer,
/// `X-Forwarded-For` is the peer's address alone, `X-Forwarded-Proto` and `-Host` are the
/// proxy's, and `Forwarded`, `X-Real-IP`, `X-Forwarded-Port`, `X-Forwarded-Prefix` are removed.
pub fn prepare_request(
    headers: &mut HeaderMap,
    client_ip: &ClientIp,
    original_host: Option<HeaderValue>,
    proto: &'static str,
    upstream_host: &HeaderValue,
    preserve_host: bool,
) {
    strip_hop_by_hop(headers);
    // Room for the X-Forwarded-* fields at once, rather than a regrowth per field.
    headers.reserve(3);
    headers.remove(header::PROXY_AUTHORIZATION);
    fold_cookies(headers);
    if client_ip.trusted {
        append_forwarded_for(headers, client_ip);
        if !headers.contains_key(&X_FORWARDED_PROTO) {
            headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(proto));
        }
        if let (false, Some(h)) = (headers.contains_key(&X_FORWARDED_HOST), &original_host) {
            headers.insert(X_FORWARDED_HOST, h.clone());
        }
    } else {
        for name in &FROM_TRUSTED_ONLY {
            headers.remove(name);
        }
        match &client_ip.header {
            Some(v) => {
                headers.insert(X_FORWARDED_FOR, v.clone());
            }
            None => {
                headers.remove(X_FORWARDED_FOR);
            }
        }
        headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(proto));
        match &original_host {
            Some(h) => {
                headers.insert(X_FORWARDED_HOST, h.clone());
            }
            None => {
                headers.remove(X_FORWARDED_HOST);
            }
        }
    }
    let host = match (preserve_host, original_host) {
        (true, Some(h)) => h,
        _ => upstream_host.clone(),
    };
    headers.insert(header::HOST, host);
}

/// HTTP/2 clients may split `Cookie` into several fields; an HTTP/1.1 backend expects one
/// (RFC 9113 §8.2.3: concatenate with "; ").
fn fold_cookies(headers: &mut HeaderMap) {
    if headers.get_all(header::COOKIE).iter().nth(1).is_none() {
        return;
    }
    let joined = headers
        .get_all(header::COOKIE)
        .iter()
        .map(HeaderValue::as_bytes)
        .collect::<Vec<_>>()
        .join(&b"; "[..]);
    if let Ok(mut v) = HeaderValue::from_bytes(&joined) {
        v.set_sensitive(true);
        headers.insert(header::COOKIE, v);
    }
}

/// Appends a trusted peer's address to `X-Forwarded-For`, folding multiple fields into one.
fn append_forwarded_for(headers: &mut HeaderMap, client: &ClientIp) {
    let existing: Vec<&str> = headers
        .get_all(&X_FORWARDED_FOR)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    let value = match (existing.is_empty(), &client.header) {
        (true, Some(v)) => Ok(v.clone()),
        (true, None) => HeaderValue::from_str(&client.ip.to_string()),
        (false, _) => HeaderValue::from_str(&format!("{}, {}", existing.join(", "), client.ip)),
    };
    if let Ok(v) = value {
        headers.insert(X_FORWARDED_FOR, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).expect("name"),
                HeaderValue::from_str(v).expect("value"),
            );
        }
        h
    }

    #[test]
    fn every_connection_header_value_is_removed() {
        let mut h = map(&[
            ("connection", "x-a"),
            ("connection", "x-b, keep-alive"),
            ("x-a", "1"),
            ("x-b", "2"),
            ("x-c", "3"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("upgrade", "websocket"),
        ]);
        strip_hop_by_hop(&mut h);
        assert!(h.get("x-a").is_none());
        assert!(h.get("x-b").is_none());
        assert!(h.get("connection").is_none());
        assert!(h.get("keep-alive").is_none());
        assert!(h.get("te").is_none());
        assert!(h.get("upgrade").is_none());
        assert_eq!(h.get("x-c").map(|v| v.as_bytes()), Some(&b"3"[..]));
    }

    fn trusted(ip: &str) -> ClientIp {
        ClientIp::new(
            ip.parse().expect("ip"),
            &["127.0.0.0/8".parse().expect("net")],
        )
    }

    fn untrusted(ip: &str) -> ClientIp {
        ClientIp::new(ip.parse().expect("ip"), &[])
    }

    #[test]
    fn proxy_credentials_are_removed_and_forwarding_headers_set() {
        let mut h = map(&[
            ("authorization", "Bearer exchanged"),
            ("proxy-authorization", "Basic eA=="),
            ("x-forwarded-for", "10.0.0.1"),
            ("mcp-session-id", "abc"),
            ("last-event-id", "7"),
            ("mcp-protocol-version", "2025-11-25"),
        ]);
        let upstream = HeaderValue::from_static("127.0.0.1:8000");
        prepare_request(
            &mut h,
            &trusted("127.0.0.9"),
            Some(HeaderValue::from_static("mcp.example.com")),
            "https",
            &upstream,
            false,
        );
        assert_eq!(h.get_all("authorization").iter().count(), 1);
        assert_eq!(h["authorization"], "Bearer exchanged");
        assert!(h.get("proxy-authorization").is_none());
        assert_eq!(h["x-forwarded-for"], "10.0.0.1, 127.0.0.9");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["x-forwarded-host"], "mcp.example.com");
        assert_eq!(h["host"], "127.0.0.1:8000");
        assert_eq!(h["mcp-session-id"], "abc");
        assert_eq!(h["last-event-id"], "7");
        assert_eq!(h["mcp-protocol-version"], "2025-11-25");
    }

    #[test]
    fn an_untrusted_peer_cannot_forge_forwarding_headers() {
        let mut h = map(&[
            ("x-forwarded-for", "10.0.0.1"),
            ("x-forwarded-for", "10.0.0.2"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "evil.example"),
            ("forwarded", "for=10.0.0.1"),
            ("x-real-ip", "10.0.0.1"),
            ("x-forwarded-port", "443"),
            ("x-forwarded-prefix", "/admin"),
        ]);
        let upstream = HeaderValue::from_static("u");
        let peer = untrusted("::ffff:192.0.2.9");
        assert!(!peer.is_trusted());
        prepare_request(
            &mut h,
            &peer,
            Some(HeaderValue::from_static("public.example")),
            "http",
            &upstream,
            false,
        );
        assert_eq!(h.get_all("x-forwarded-for").iter().count(), 1);
        assert_eq!(h["x-forwarded-for"], "192.0.2.9");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "public.example");
        for name in [
            "forwarded",
            "x-real-ip",
            "x-forwarded-port",
            "x-forwarded-prefix",
        ] {
            assert!(h.get(name).is_none(), "{name}");
        }
    }

    #[test]
    fn a_trusted_proxy_keeps_what_it_set() {
        let mut h = map(&[
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "ingress.example"),
            ("x-forwarded-prefix", "/tenant"),
        ]);
        let upstream = HeaderValue::from_static("u");
        let peer = trusted("127.0.0.2");
        assert!(peer.is_trusted());
        prepare_request(
            &mut h,
            &peer,
            Some(HeaderValue::from_static("public.example")),
            "http",
            &upstream,
            false,
        );
        assert_eq!(h["x-forwarded-for"], "127.0.0.2");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["x-forwarded-host"], "ingress.example");
        assert_eq!(h["x-forwarded-prefix"], "/tenant");
    }

    #[test]
    fn split_cookies_are_folded_into_one_field() {
        let mut h = map(&[("cookie", "a=1"), ("cookie", "b=2")]);
        let upstream = HeaderValue::from_static("u");
        prepare_request(
            &mut h,
            &untrusted("127.0.0.1"),
            None,
            "http",
            &upstream,
            false,
        );
        assert_eq!(h.get_all("cookie").iter().count(), 1);
        assert_eq!(h["cookie"], "a=1; b=2");
    }

    #[test]
    fn preserve_host_keeps_the_original_host() {
        let mut h = HeaderMap::new();
        let upstream = HeaderValue::from_static("127.0.0.1:8000");
        prepare_request(
            &mut h,
            &untrusted("127.0.0.1"),
            Some(HeaderValue::from_static("public.example")),
            "http",
            &upstream,
            true,
        );
        assert_eq!(h["host"], "public.example");
    }

    proptest! {
        /// Whatever the client lists in Connection, none of it survives, and neither does a
        /// proxy credential.
        #[test]
        fn no_named_or_proxy_credential_header_survives(names in proptest::collection::vec("x-[a-z]{1,8}", 1..6)) {
            let mut h = HeaderMap::new();
            for n in &names {
                h.append(header::CONNECTION, HeaderValue::from_str(n).expect("value"));
                h.append(HeaderName::from_bytes(n.as_bytes()).expect("name"), HeaderValue::from_static("v"));
            }
            h.insert(header::PROXY_AUTHORIZATION, HeaderValue::from_static("Basic c2VjcmV0"));
            let upstream = HeaderValue::from_static("u");
            prepare_request(&mut h, &untrusted("127.0.0.1"), None, "http", &upstream, false);
            for n in &names {
                prop_assert!(h.get(n.as_str()).is_none());
            }
            prop_assert!(h.get(header::PROXY_AUTHORIZATION).is_none());
            prop_assert!(h.get(header::CONNECTION).is_none());
        }
    }
}
