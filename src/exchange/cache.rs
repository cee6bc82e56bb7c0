//! The exchanged-token cache: key derivation and entry lifetimes (SPEC "Cache").
//!
//! **Key.** A SHA-256 digest over length-prefixed fields: a domain tag, every parameter of
//! the exchange (issuer, configured token endpoint, client id, token types, audiences,
//! resources, scope, extra parameters), then the subject token. The parameter part is absorbed
//! once into a [`KeyDeriver`]; a lookup clones that digest state and adds only the subject
//! token. Every field is prefixed with its length and every list with its count, so no two
//! different inputs encode to the same bytes (`["ab"]` and `["a", "b"]` differ).
//!
//! **Lifetime.** An entry lives until the earliest of the IdP's `expires_in` (or the issued
//! token's `exp`), the subject token's `exp` and `cache.max_ttl`; it is served only until
//! `cache.expiry_margin` before that end ([`serve_window`]). An exchange whose window is empty
//! is used for the request (and any requests coalesced onto it) but not kept.
//!
//! **Clocks.** moka expires entries by its own clock; the entry also carries its deadline as a
//! [`tokio::time::Instant`], checked on every read, so that what is served follows the tokio
//! clock (which tests pause and advance).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lc_rs::digest;
use http::HeaderValue;
use tokio::time::Instant;

use crate::config::Exchange;

/// A cache key: the SHA-256 digest of the exchange parameters and the subject token.
pub(crate) type CacheKey = [u8; 32];

/// Separates this digest from any other SHA-256 use; bump the version if the layout changes.
const KEY_DOMAIN: &[u8] = b"token-exchange-proxy/exchange-cache/v1";

/// Digest state that has absorbed every exchange parameter; cloned for each lookup.
#[derive(Clone)]
pub(crate) struct KeyDeriver {
    prefix: digest::Context,
}

impl std::fmt::Debug for KeyDeriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KeyDeriver")
    }
}

impl KeyDeriver {
    /// Absorbs every parameter of `config` that goes into the token request.
    pub(crate) fn new(config: &Exchange) -> Self {
        let mut ctx = digest::Context::new(&digest::SHA256);
        field(&mut ctx, KEY_DOMAIN);
        field(&mut ctx, config.issuer.as_bytes());
        optional(
            &mut ctx,
            config
                .token_endpoint
                .as_ref()
                .map(|u| u.as_str().as_bytes()),
        );
        field(&mut ctx, config.client_id.as_bytes());
        field(&mut ctx, config.subject_token_type.as_bytes());
        field(&mut ctx, config.requested_token_type.as_bytes());
        list(
            &mut ctx,
            config.audience.iter().map(String::as_bytes),
            config.audience.len(),
        );
        list(
            &mut ctx,
            config.resource.iter().map(String::as_bytes),
            config.resource.len(),
        );
        optional(&mut ctx, config.scope.as_deref().map(str::as_bytes));
        count(&mut ctx, config.extra_params.len());
        for (k, v) in &config.extra_params {
            field(&mut ctx, k.as_bytes());
            field(&mut ctx, v.as_bytes());
        }
        Self { prefix: ctx }
    }

    /// The key for a subject token under these parameters, from the token's SHA-256 digest
    /// (which the validator has already computed): the subject enters the key as its digest,
    /// so a lookup hashes 32 bytes instead of the whole token.
    pub(crate) fn key(&self, subject_digest: &[u8; 32]) -> CacheKey {
        let mut ctx = self.prefix.clone();
        field(&mut ctx, subject_digest);
        let mut key = [0u8; 32];
        key.copy_from_slice(ctx.finish().as_ref());
        key
    }
}

fn count(ctx: &mut digest::Context, n: usize) {
    ctx.update(&(n as u64).to_be_bytes());
}

fn field(ctx: &mut digest::Context, bytes: &[u8]) {
    count(ctx, bytes.len());
    ctx.update(bytes);
}

fn optional(ctx: &mut digest::Context, bytes: Option<&[u8]>) {
    match bytes {
        None => ctx.update(&[0]),
        Some(b) => {
            ctx.update(&[1]);
            field(ctx, b);
        }
    }
}

fn list<'a>(ctx: &mut digest::Context, items: impl Iterator<Item = &'a [u8]>, n: usize) {
    count(ctx, n);
    for item in items {
        field(ctx, item);
    }
}

/// A cached exchange result.
#[derive(Clone, Debug)]
pub(crate) struct CachedToken {
    /// `Bearer <token>`, marked sensitive.
    pub(crate) authorization: HeaderValue,
    /// Served while `now < serve_until` (tokio clock).
    pub(crate) serve_until: Instant,
    /// `serve_until - insertion time`: what moka is told, by its own clock.
    pub(crate) ttl: Duration,
}

impl CachedToken {
    /// An entry usable for `window` from `now` (zero: for the current request only).
    pub(crate) fn new(authorization: HeaderValue, window: Duration, now: Instant) -> Self {
        Self {
            authorization,
            serve_until: now + window,
            ttl: window,
        }
    }

    /// Whether the entry may still be served at `now`.
    pub(crate) fn is_servable(&self, now: Instant) -> bool {
        now < self.serve_until
    }
}

/// Tells moka each entry's own time to live.
pub(crate) struct EntryExpiry;

impl moka::Expiry<CacheKey, CachedToken> for EntryExpiry {
    fn expire_after_create(
        &self,
        _key: &CacheKey,
        value: &CachedToken,
        _created_at: std::time::Instant,
    ) -> Option<Duration> {
        Some(value.ttl)
    }

    fn expire_after_update(
        &self,
        _key: &CacheKey,
        value: &CachedToken,
        _updated_at: std::time::Instant,
        _duration_until_expiry: Option<Duration>,
    ) -> Option<Duration> {
        Some(value.ttl)
    }
}

/// How long an exchanged token lives: the earliest of the IdP's lifetime (`None`: the IdP
/// said nothing, so `max_ttl` decides), the subject token's remaining lifetime (`None`: the
/// subject has no `exp`), and `max_ttl`.
pub(crate) fn entry_lifetime(
    idp: Option<Duration>,
    subject: Option<Duration>,
    max_ttl: Duration,
) -> Duration {
    [idp, subject]
        .into_iter()
        .flatten()
        .fold(max_ttl, Duration::min)
}

/// How long an entry may be served: its lifetime minus the expiry margin (SPEC: "an entry
/// within `expiry_margin` of its end is not served"). Zero means "do not cache".
pub(crate) fn serve_window(lifetime: Duration, margin: Duration) -> Duration {
    lifetime.saturating_sub(margin)
}

/// Time left until `exp` (seconds since the Unix epoch) at wall-clock `now`; zero if passed.
pub(crate) fn remaining_until(exp: u64, now: SystemTime) -> Duration {
    let now = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    Duration::from_secs(exp).saturating_sub(now)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;
    use crate::config::ClientAuth;

    fn config() -> Exchange {
        Exchange {
            token_endpoint: None,
            issuer: "https://idp.example.com".into(),
            client_id: "txp".into(),
            client_auth: ClientAuth::None,
            audience: vec!["nextcloud".into()],
            resource: vec![],
            scope: Some("notes.read".into()),
            subject_token_type: crate::config::ACCESS_TOKEN_TYPE.into(),
            requested_token_type: crate::config::ACCESS_TOKEN_TYPE.into(),
            extra_params: BTreeMap::new(),
            timeout: Duration::from_secs(5),
        }
    }

    fn key_with(change: impl FnOnce(&mut Exchange), subject: &str) -> CacheKey {
        let mut c = config();
        change(&mut c);
        KeyDeriver::new(&c).key(&crate::inbound::cache::digest(subject))
    }

    #[test]
    fn same_parameters_and_subject_give_the_same_key() {
        assert_eq!(key_with(|_| {}, "token-a"), key_with(|_| {}, "token-a"));
        let d = KeyDeriver::new(&config());
        let digest = crate::inbound::cache::digest("token-a");
        assert_eq!(d.key(&digest), d.clone().key(&digest));
    }

    #[test]
    fn every_parameter_and_the_subject_change_the_key() {
        let base = key_with(|_| {}, "token-a");
        let variants: Vec<(&str, CacheKey)> = vec![
            ("subject", key_with(|_| {}, "token-b")),
            (
                "audience",
                key_with(|c| c.audience = vec!["calendar".into()], "token-a"),
            ),
            (
                "extra audience",
                key_with(|c| c.audience.push("calendar".into()), "token-a"),
            ),
            (
                "resource",
                key_with(
                    |c| c.resource = vec!["https://api.example.com".into()],
                    "token-a",
                ),
            ),
            (
                "scope",
                key_with(|c| c.scope = Some("notes.write".into()), "token-a"),
            ),
            ("no scope", key_with(|c| c.scope = None, "token-a")),
            (
                "empty scope",
                key_with(|c| c.scope = Some(String::new()), "token-a"),
            ),
            (
                "client id",
                key_with(|c| c.client_id = "other".into(), "token-a"),
            ),
            (
                "issuer",
                key_with(|c| c.issuer = "https://other.example.com".into(), "token-a"),
            ),
            (
                "subject type",
                key_with(|c| c.subject_token_type = "urn:x:jwt".into(), "token-a"),
            ),
            (
                "requested type",
                key_with(|c| c.requested_token_type = "urn:x:jwt".into(), "token-a"),
            ),
            (
                "extra param",
                key_with(
                    |c| {
                        c.extra_params.insert("tenant".into(), "a".into());
                    },
                    "token-a",
                ),
            ),
            (
                "endpoint",
                key_with(
                    |c| {
                        c.token_endpoint =
                            Some("https://idp.example.com/token".parse().expect("url"));
                    },
                    "token-a",
                ),
            ),
        ];
        for (what, key) in &variants {
            assert_ne!(*key, base, "{what} must change the key");
        }
        for (i, (a, ka)) in variants.iter().enumerate() {
            for (b, kb) in &variants[i + 1..] {
                assert_ne!(ka, kb, "{a} and {b} collide");
            }
        }
    }

    #[test]
    fn list_boundaries_are_part_of_the_key() {
        let joined = key_with(|c| c.audience = vec!["ab".into()], "t");
        let split = key_with(|c| c.audience = vec!["a".into(), "b".into()], "t");
        assert_ne!(joined, split);
        // A value moved from one list to the next is a different exchange.
        let in_audience = key_with(|c| c.audience = vec!["x".into()], "t");
        let in_resource = key_with(
            |c| {
                c.audience = vec![];
                c.resource = vec!["x".into()];
            },
            "t",
        );
        assert_ne!(in_audience, in_resource);
        let kv1 = key_with(
            |c| {
                c.extra_params.insert("ab".into(), "c".into());
            },
            "t",
        );
        let kv2 = key_with(
            |c| {
                c.extra_params.insert("a".into(), "bc".into());
            },
            "t",
        );
        assert_ne!(kv1, kv2);
    }

    #[test]
    fn lifetime_takes_the_earliest_bound() {
        let s = Duration::from_secs;
        assert_eq!(entry_lifetime(Some(s(300)), Some(s(20)), s(300)), s(20));
        assert_eq!(entry_lifetime(Some(s(60)), Some(s(3600)), s(300)), s(60));
        assert_eq!(entry_lifetime(None, None, s(300)), s(300));
        assert_eq!(entry_lifetime(Some(s(3600)), None, s(300)), s(300));
        assert_eq!(serve_window(s(20), s(15)), s(5));
        assert_eq!(serve_window(s(10), s(15)), Duration::ZERO);
    }

    #[test]
    fn remaining_lifetime_of_the_subject() {
        let now = UNIX_EPOCH + Duration::from_millis(1_000_500);
        assert_eq!(remaining_until(1_020, now), Duration::from_millis(19_500));
        assert_eq!(remaining_until(999, now), Duration::ZERO);
    }

    #[test]
    fn an_entry_is_served_strictly_before_its_deadline() {
        let now = Instant::now();
        let e = CachedToken::new(
            HeaderValue::from_static("Bearer x"),
            Duration::from_secs(5),
            now,
        );
        assert!(e.is_servable(now));
        assert!(e.is_servable(now + Duration::from_millis(4_999)));
        assert!(!e.is_servable(now + Duration::from_secs(5)));
        let once = CachedToken::new(HeaderValue::from_static("Bearer x"), Duration::ZERO, now);
        assert!(!once.is_servable(now));
    }

    proptest! {
        #[test]
        fn lifetime_never_exceeds_any_bound(
            idp in proptest::option::of(0u64..100_000),
            subject in proptest::option::of(0u64..100_000),
            max_ttl in 0u64..100_000,
            margin in 0u64..1_000,
        ) {
            let s = Duration::from_secs;
            let lifetime = entry_lifetime(idp.map(s), subject.map(s), s(max_ttl));
            prop_assert!(lifetime <= s(max_ttl));
            if let Some(i) = idp { prop_assert!(lifetime <= s(i)); }
            if let Some(j) = subject { prop_assert!(lifetime <= s(j)); }
            // It is one of the bounds, not something smaller.
            let bounds = [idp, subject, Some(max_ttl)];
            prop_assert!(bounds.iter().flatten().any(|b| s(*b) == lifetime));

            let window = serve_window(lifetime, s(margin));
            // Never served within the margin of the end...
            prop_assert!(window + s(margin) <= lifetime || window.is_zero());
            // ...and served for all of the rest.
            prop_assert_eq!(window, s(lifetime.as_secs().saturating_sub(margin)));
        }
    }
}
