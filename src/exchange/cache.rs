//! The exchanged-token cache: key derivation and entry lifetimes (README "Caches, refreshes and the IdP circuit").
//!
//! **Key.** A SHA-256 digest over length-prefixed fields: a domain tag, the profile, every
//! parameter of the exchange (grant, issuer, configured token endpoint, client id, token
//! types, audiences, resources, scope, extra parameters), then the subject token, which
//! enters as its own SHA-256 digest: a request's token is hashed once, and that digest serves
//! the lookups of every profile and the validator's decision cache alike. The parameter part
//! is hashed once into a [`KeyDeriver`]; a lookup finishes that hash with the subject's
//! digest, one SHA-256 block: the parameter part ends with a padding field of zeros up to a
//! block boundary. Every field is prefixed with its length and every list with its count, so
//! no two different inputs encode to the same bytes (`["ab"]` and `["a", "b"]` differ).
//! Inside the cache the key is hashed by [`KeyHasher`]: it is already a digest, so a seeded
//! fold of its bytes is enough.
//!
//! **Lifetime.** An entry lives until the earliest of the IdP's `expires_in` (or the issued
//! token's `exp`), the subject token's `exp` and `cache.max_ttl`; it is served only until
//! `cache.expiry_margin` before that end ([`serve_window`]). An exchange whose window is empty
//! is used for the request (and any requests coalesced onto it) but not kept.
//!
//! **Clocks.** An entry carries its deadlines as [`tokio::time::Instant`]s, checked on every
//! read, so what is served follows the tokio clock (which tests pause and advance); the store
//! lets an entry go at the end of its lifetime (`store`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lc_rs::digest;
use http::HeaderValue;
use tokio::time::Instant;

use crate::config::Exchange;
use crate::inbound::Principal;

/// A cache key: the SHA-256 digest of the exchange parameters and the subject token.
pub type CacheKey = [u8; 32];

/// Separates this digest from any other SHA-256 use; bump the version if the layout changes.
const KEY_DOMAIN: &[u8] = b"token-exchange-proxy/exchange-cache/v3";

/// The exchange parameters, hashed once; each lookup finishes the hash with its subject
/// token's digest.
#[derive(Clone)]
pub(crate) struct KeyDeriver {
    /// SHA-256 with the parameter fields already absorbed.
    params: digest::Context,
}

impl std::fmt::Debug for KeyDeriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KeyDeriver")
    }
}

impl KeyDeriver {
    /// Encodes `profile` and every parameter of `config` that goes into the token request.
    pub(crate) fn new(config: &Exchange, profile: &str) -> Self {
        let mut params = digest::Context::new(&digest::SHA256);
        params.update(&encode(config, profile));
        Self { params }
    }

    /// The key for a subject token under these parameters.
    pub(crate) fn key(&self, subject: &[u8]) -> CacheKey {
        let mut d = [0u8; 32];
        d.copy_from_slice(digest::digest(&digest::SHA256, subject).as_ref());
        self.key_of(&d)
    }

    /// The key for the subject token whose SHA-256 digest is `subject_digest`. Kept out of
    /// line (one call per request) so that profiles name it (`benches/profile.sh`).
    #[inline(never)]
    pub(crate) fn key_of(&self, subject_digest: &[u8; 32]) -> CacheKey {
        let mut ctx = self.params.clone();
        let mut tail = [0u8; 40];
        tail[..8].copy_from_slice(&32u64.to_be_bytes());
        tail[8..].copy_from_slice(subject_digest);
        ctx.update(&tail);
        let mut key = [0u8; 32];
        key.copy_from_slice(ctx.finish().as_ref());
        key
    }
}

/// The length-prefixed parameter fields of [`KeyDeriver`].
fn encode(config: &Exchange, profile: &str) -> Vec<u8> {
    let mut out = Vec::new();
    field(&mut out, KEY_DOMAIN);
    field(&mut out, profile.as_bytes());
    field(
        &mut out,
        match config.grant {
            crate::config::Grant::TokenExchange => b"token_exchange",
            crate::config::Grant::JwtBearerObo => b"jwt_bearer_obo",
        },
    );
    field(&mut out, config.issuer.as_bytes());
    optional(
        &mut out,
        config
            .token_endpoint
            .as_ref()
            .map(|u| u.as_str().as_bytes()),
    );
    field(&mut out, config.client_id.as_bytes());
    field(&mut out, config.subject_token_type.as_bytes());
    field(&mut out, config.requested_token_type.as_bytes());
    list(
        &mut out,
        config.audience.iter().map(String::as_bytes),
        config.audience.len(),
    );
    list(
        &mut out,
        config.resource.iter().map(String::as_bytes),
        config.resource.len(),
    );
    optional(&mut out, config.scope.as_deref().map(str::as_bytes));
    count(&mut out, config.extra_params.len());
    for (k, v) in &config.extra_params {
        field(&mut out, k.as_bytes());
        field(&mut out, v.as_bytes());
    }
    // Zeros up to the end of a SHA-256 block (64 bytes), so that the subject's part (40
    // bytes) and SHA-256's own padding (9) fit one block: each lookup hashes one block, not
    // two.
    let fill = (BLOCK - (out.len() + 8) % BLOCK) % BLOCK;
    field(&mut out, &[0u8; BLOCK][..fill]);
    out
}

/// SHA-256's block size in bytes.
const BLOCK: usize = 64;

fn count(out: &mut Vec<u8>, n: usize) {
    out.extend_from_slice(&(n as u64).to_be_bytes());
}

fn field(out: &mut Vec<u8>, bytes: &[u8]) {
    count(out, bytes.len());
    out.extend_from_slice(bytes);
}

fn optional(out: &mut Vec<u8>, bytes: Option<&[u8]>) {
    match bytes {
        None => out.push(0),
        Some(b) => {
            out.push(1);
            field(out, b);
        }
    }
}

fn list<'a>(out: &mut Vec<u8>, items: impl Iterator<Item = &'a [u8]>, n: usize) {
    count(out, n);
    for item in items {
        field(out, item);
    }
}

/// Hashes cache keys inside the cache. A key is a SHA-256 digest, uniformly distributed
/// already; folding its bytes with a per-process random seed costs a few instructions where
/// SipHash costs hundreds, and the seed keeps bucket positions unpredictable.
#[derive(Clone, Debug)]
pub(crate) struct KeyHasherBuilder {
    seed: u64,
}

impl KeyHasherBuilder {
    /// A builder with a fresh random seed (from the standard library's per-process random
    /// hash keys: cheap at start-up, where seeding aws-lc's generator would cost tens of ms).
    pub(crate) fn new() -> Self {
        use std::hash::{BuildHasher, Hasher};
        Self {
            seed: std::hash::RandomState::new().build_hasher().finish(),
        }
    }
}

impl std::hash::BuildHasher for KeyHasherBuilder {
    type Hasher = KeyHasher;

    fn build_hasher(&self) -> KeyHasher {
        KeyHasher { state: self.seed }
    }
}

/// See [`KeyHasherBuilder`].
#[derive(Debug)]
pub(crate) struct KeyHasher {
    state: u64,
}

/// An odd constant with well-mixed bits (from the golden ratio).
const FOLD: u64 = 0x9e37_79b9_7f4a_7c15;

impl KeyHasher {
    fn mix(&mut self, word: u64) {
        let m = u128::from(self.state ^ word) * u128::from(FOLD);
        self.state = (m as u64) ^ ((m >> 64) as u64);
    }
}

impl std::hash::Hasher for KeyHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let mut word = [0u8; 8];
            word.copy_from_slice(c);
            self.mix(u64::from_le_bytes(word));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut word = [0u8; 8];
            word[..rest.len()].copy_from_slice(rest);
            self.mix(u64::from_le_bytes(word) ^ ((rest.len() as u64) << 56));
        }
    }

    fn write_usize(&mut self, n: usize) {
        self.mix(n as u64);
    }

    fn finish(&self) -> u64 {
        self.state
    }
}

/// A cached exchange result, with the validation of the subject token it rests on.
#[derive(Clone, Debug)]
pub(crate) struct CachedToken {
    /// `Bearer <token>`, marked sensitive.
    pub(crate) authorization: HeaderValue,
    /// Served while `now < serve_until` (tokio clock).
    pub(crate) serve_until: Instant,
    /// The end of the entry's lifetime (the earliest of the issued token's, the subject
    /// token's and `cache.max_ttl`'s end): the store lets it go then. Between `serve_until`
    /// and this the entry is stale: served only while the IdP is unavailable
    /// (`cache.stale_if_error`).
    pub(crate) lifetime_end: Instant,
    /// From this moment a request that uses the entry has it exchanged again in the
    /// background (`cache.refresh_ahead`); never, when a new exchange could not serve longer.
    pub(crate) refresh_from: Option<Instant>,
    /// Set by the request that started the refresh (shared by every copy of the entry), so
    /// that an entry is refreshed once.
    pub(crate) refresh_claimed: Arc<AtomicBool>,
    /// The subject token's `sub`, for the access log of requests served from this entry.
    pub(crate) sub: Option<Arc<str>>,
    /// The subject token's `exp` (seconds since the Unix epoch).
    pub(crate) subject_expires_at: Option<u64>,
    /// The subject token's acceptance ([`Principal::trusted_until`]): while it holds, a
    /// request with the same token is served without validating the token again.
    pub(crate) trusted_until: Option<Instant>,
    /// [`Principal::key_epoch`] of that acceptance.
    pub(crate) key_epoch: u64,
    /// [`Principal::profile`] of that acceptance.
    pub(crate) profile: usize,
}

impl CachedToken {
    /// An entry served for `window` from `now` (zero: for the current request only) and
    /// kept for `lifetime`, resting on no validation yet (see [`CachedToken::resting_on`]).
    pub(crate) fn new(
        authorization: HeaderValue,
        window: Duration,
        lifetime: Duration,
        now: Instant,
    ) -> Self {
        Self {
            authorization,
            serve_until: now + window,
            lifetime_end: now + lifetime.max(window),
            refresh_from: None,
            refresh_claimed: Arc::default(),
            sub: None,
            subject_expires_at: None,
            trusted_until: None,
            key_epoch: 0,
            profile: 0,
        }
    }

    /// The entry resting on `principal`'s acceptance (its `sub`, `exp`, trust and key epoch).
    pub(crate) fn resting_on(self, principal: &Principal) -> Self {
        Self {
            sub: principal.sub.clone(),
            subject_expires_at: principal.expires_at,
            trusted_until: principal.trusted_until,
            key_epoch: principal.key_epoch,
            profile: principal.profile,
            ..self
        }
    }

    /// The same entry resting on a newer acceptance.
    pub(crate) fn retrusted(&self, principal: &Principal) -> Self {
        self.clone().resting_on(principal)
    }

    /// Whether the entry may still be served at `now`.
    pub(crate) fn is_servable(&self, now: Instant) -> bool {
        now < self.serve_until
    }

    /// Whether the entry is past its serving window but not its lifetime at `now`: what
    /// `cache.stale_if_error` may serve.
    pub(crate) fn is_stale(&self, now: Instant) -> bool {
        self.serve_until <= now && now < self.lifetime_end
    }

    /// The entry, exchanged again from `ahead` before the end of its serving window, if a new
    /// exchange made now could serve longer: not when the subject token's own end
    /// (`subject_end`, tokio clock) minus `margin` bounds the window already.
    pub(crate) fn refreshing_ahead(
        self,
        ahead: Duration,
        subject_end: Option<Instant>,
        margin: Duration,
    ) -> Self {
        let could_extend = subject_end.is_none_or(|end| {
            end.checked_sub(margin)
                .is_some_and(|e| e > self.serve_until)
        });
        let refresh_from = (!ahead.is_zero() && could_extend).then(|| {
            self.serve_until
                .checked_sub(ahead)
                .unwrap_or(self.serve_until)
        });
        Self {
            refresh_from,
            ..self
        }
    }

    /// Whether a request at `now` should start this entry's refresh: it is due, and no
    /// request started it before (the first to ask claims it).
    pub(crate) fn claim_refresh(&self, now: Instant) -> bool {
        self.refresh_from.is_some_and(|from| from <= now)
            && self
                .refresh_claimed
                .compare_exchange(false, true, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
    }

    /// Whether the acceptance it rests on still holds at `now` in key epoch `epoch`.
    pub(crate) fn is_trusted(&self, now: Instant, epoch: u64) -> bool {
        crate::inbound::acceptance_holds(self.trusted_until, self.key_epoch, now, epoch)
    }

    /// The acceptance this entry rests on, as the validator would have made it.
    pub(crate) fn principal(&self) -> Principal {
        Principal {
            sub: self.sub.clone(),
            expires_at: self.subject_expires_at,
            trusted_until: self.trusted_until,
            key_epoch: self.key_epoch,
            profile: self.profile,
        }
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

/// How long an entry may be served: its lifetime minus the expiry margin (README "Caches, refreshes and the IdP circuit": "an entry
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
            grant: crate::config::Grant::TokenExchange,
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
            max_concurrent: 64,
            negative_ttl: Duration::from_secs(10),
            verify_issued: crate::config::VerifyIssued::Auto,
        }
    }

    fn key_with(change: impl FnOnce(&mut Exchange), subject: &str) -> CacheKey {
        let mut c = config();
        change(&mut c);
        KeyDeriver::new(&c, "").key(subject.as_bytes())
    }

    #[test]
    fn same_parameters_and_subject_give_the_same_key() {
        assert_eq!(key_with(|_| {}, "token-a"), key_with(|_| {}, "token-a"));
        let d = KeyDeriver::new(&config(), "");
        assert_eq!(d.key(b"token-a"), d.clone().key(b"token-a"));
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
    fn the_key_is_sha256_of_the_documented_encoding() {
        // Written out by hand: domain, profile, grant, issuer, no endpoint, client id, token
        // types, audiences, resources, scope, extra parameters, the subject's SHA-256; lengths
        // and counts as u64 big-endian.
        fn f(out: &mut Vec<u8>, b: &[u8]) {
            out.extend_from_slice(&(b.len() as u64).to_be_bytes());
            out.extend_from_slice(b);
        }
        let c = config();
        let mut expected = Vec::new();
        f(&mut expected, b"token-exchange-proxy/exchange-cache/v3");
        f(&mut expected, b"corp");
        f(&mut expected, b"token_exchange");
        f(&mut expected, c.issuer.as_bytes());
        expected.push(0);
        f(&mut expected, b"txp");
        f(&mut expected, crate::config::ACCESS_TOKEN_TYPE.as_bytes());
        f(&mut expected, crate::config::ACCESS_TOKEN_TYPE.as_bytes());
        expected.extend_from_slice(&1u64.to_be_bytes());
        f(&mut expected, b"nextcloud");
        expected.extend_from_slice(&0u64.to_be_bytes());
        expected.push(1);
        f(&mut expected, b"notes.read");
        expected.extend_from_slice(&0u64.to_be_bytes());
        // The padding field: the parameter part ends on a 64-byte block boundary.
        let fill = (64 - (expected.len() + 8) % 64) % 64;
        f(&mut expected, &vec![0u8; fill]);
        assert_eq!(expected.len() % 64, 0);
        f(
            &mut expected,
            digest::digest(&digest::SHA256, b"the-subject-token").as_ref(),
        );
        let want = digest::digest(&digest::SHA256, &expected);
        assert_eq!(
            &KeyDeriver::new(&c, "corp").key(b"the-subject-token")[..],
            want.as_ref()
        );
    }

    #[test]
    fn the_parameter_part_ends_on_a_block_boundary_whatever_its_length() {
        // Every length of one field modulo the block size: the padding field always brings
        // the parameter part to a whole number of blocks, so a lookup hashes one block.
        for n in 0..BLOCK * 2 {
            let mut c = config();
            c.client_id = "c".repeat(n);
            let encoded = encode(&c, "corp");
            assert_eq!(encoded.len() % BLOCK, 0, "client id of {n} bytes");
        }
    }

    #[test]
    fn keys_hash_alike_within_a_cache_and_differently_across_seeds() {
        use std::hash::BuildHasher;
        let a = KeyDeriver::new(&config(), "").key(b"token-a");
        let b = KeyDeriver::new(&config(), "").key(b"token-b");
        let one = KeyHasherBuilder { seed: 1 };
        let two = KeyHasherBuilder { seed: 2 };
        assert_eq!(one.hash_one(a), one.hash_one(a));
        assert_ne!(one.hash_one(a), one.hash_one(b));
        assert_ne!(one.hash_one(a), two.hash_one(a), "the seed moves every key");
        // Keys differing in one byte anywhere hash apart.
        for i in 0..32 {
            let mut c = a;
            c[i] ^= 1;
            assert_ne!(one.hash_one(a), one.hash_one(c), "byte {i}");
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
            Duration::from_secs(20),
            now,
        );
        assert!(e.is_servable(now));
        assert!(e.is_servable(now + Duration::from_millis(4_999)));
        assert!(!e.is_servable(now + Duration::from_secs(5)));
        assert_eq!(e.lifetime_end, now + Duration::from_secs(20));
        let once = CachedToken::new(
            HeaderValue::from_static("Bearer x"),
            Duration::ZERO,
            Duration::from_secs(10),
            now,
        );
        assert!(!once.is_servable(now));
    }

    proptest! {
        /// An entry lives until the earliest bound and is served exactly while more than the
        /// margin is left of that life: probed at a random moment of (or after) it, through
        /// the entry that [`serve_window`] and [`CachedToken::new`] build.
        #[test]
        fn an_entry_is_served_only_while_more_than_the_margin_is_left(
            idp in proptest::option::of(0u64..100_000),
            subject in proptest::option::of(0u64..100_000),
            max_ttl in 0u64..100_000,
            margin in 0u64..1_000,
            probe_permille in 0u64..=1_100,
        ) {
            let ms = Duration::from_millis;
            let lifetime = entry_lifetime(idp.map(ms), subject.map(ms), ms(max_ttl));
            let earliest = [idp, subject, Some(max_ttl)].into_iter().flatten().min();
            prop_assert_eq!(Some(lifetime), earliest.map(ms));

            let now = Instant::now();
            let entry = CachedToken::new(
                HeaderValue::from_static("Bearer x"),
                serve_window(lifetime, ms(margin)),
                lifetime,
                now,
            );
            prop_assert_eq!(entry.lifetime_end, now + lifetime);
            let t = lifetime * u32::try_from(probe_permille).unwrap_or(0) / 1000;
            let left = lifetime.checked_sub(t);
            let expected = left.is_some_and(|left| left > ms(margin));
            prop_assert_eq!(
                entry.is_servable(now + t),
                expected,
                "at {:?} of {:?} with margin {:?}",
                t,
                lifetime,
                ms(margin)
            );
            // The last moment with more than the margin left is served.
            if lifetime > ms(margin) {
                let last = lifetime - ms(margin) - Duration::from_nanos(1);
                prop_assert!(entry.is_servable(now + last));
            }
        }
    }
}
