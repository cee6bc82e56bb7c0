//! Decisions about tokens already seen, so a token presented again is not parsed, verified or
//! introspected again.
//!
//! The key is the SHA-256 digest of the token (the token itself is never stored). Each entry
//! lives no longer than the token it describes and no longer than a fixed cap; an accepted
//! token is also checked against its `exp` on every read, so a stale entry cannot outlive it.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_lc_rs::digest;

use super::{InboundError, Principal};

/// A SHA-256 digest of a token.
pub type TokenDigest = [u8; 32];

/// The digest under which decisions about `token` are stored.
pub fn digest(token: &str) -> TokenDigest {
    let mut out = [0u8; 32];
    out.copy_from_slice(digest::digest(&digest::SHA256, token.as_bytes()).as_ref());
    out
}

/// One remembered decision.
#[derive(Debug, Clone)]
pub struct Entry {
    /// The principal, or the (time-independent) reason the token was refused.
    pub decision: Result<Principal, InboundError>,
    /// How long the entry may be kept, from insertion.
    pub ttl: Duration,
}

impl Entry {
    /// False when an accepted token has passed its `exp` (plus `leeway`) at `now`.
    pub fn fresh(&self, now: i64, leeway: i64) -> bool {
        match &self.decision {
            Ok(p) => p
                .expires_at
                .and_then(|e| i64::try_from(e).ok())
                .is_none_or(|exp| now < exp.saturating_add(leeway)),
            Err(_) => true,
        }
    }
}

/// Gives every entry its own lifetime.
struct PerEntryTtl;

impl moka::Expiry<TokenDigest, Entry> for PerEntryTtl {
    fn expire_after_create(&self, _: &TokenDigest, value: &Entry, _: Instant) -> Option<Duration> {
        Some(value.ttl)
    }
}

/// A bounded map from token digest to decision.
pub struct DecisionCache {
    inner: moka::future::Cache<TokenDigest, Entry>,
    leeway: i64,
}

impl std::fmt::Debug for DecisionCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DecisionCache")
            .field("entries", &self.inner.entry_count())
            .finish()
    }
}

impl DecisionCache {
    /// A cache of at most `max_entries` decisions; `leeway` (seconds) as in the claim checks.
    pub fn new(max_entries: u64, leeway: i64) -> Self {
        Self {
            inner: moka::future::Cache::builder()
                .max_capacity(max_entries)
                .expire_after(PerEntryTtl)
                .build(),
            leeway,
        }
    }

    /// The decision remembered for `key`, if it is still fresh at `now`.
    pub async fn get(
        &self,
        key: &TokenDigest,
        now: i64,
    ) -> Option<Result<Principal, InboundError>> {
        let entry = self.inner.get(key).await?;
        if entry.fresh(now, self.leeway) {
            Some(entry.decision)
        } else {
            self.inner.invalidate(key).await;
            None
        }
    }

    /// Remembers `decision` for `ttl`.
    pub async fn insert(
        &self,
        key: TokenDigest,
        decision: Result<Principal, InboundError>,
        ttl: Duration,
    ) {
        self.inner.insert(key, Entry { decision, ttl }).await;
    }

    /// The remembered decision, or the result of `init`; concurrent callers with the same key
    /// wait for one `init`. An `Err` from `init` is returned to all of them and not remembered.
    pub async fn get_or_try_insert_with<F>(
        &self,
        key: TokenDigest,
        now: i64,
        init: F,
    ) -> Result<Principal, InboundError>
    where
        F: Future<Output = Result<Entry, InboundError>>,
    {
        match self.inner.try_get_with(key, init).await {
            Ok(entry) if entry.fresh(now, self.leeway) => entry.decision,
            Ok(_) => {
                self.inner.invalidate(&key).await;
                Err(super::claims::reject(
                    crate::metrics::RejectReason::Expired,
                    "token expired",
                ))
            }
            Err(e) => Err(Arc::unwrap_or_clone(e)),
        }
    }

    /// Forgets every decision (after a key left the issuer's JWKS).
    pub fn clear(&self) {
        self.inner.invalidate_all();
    }

    /// Forgets the acceptances of tokens whose `sub` is `sub` (`None`: every decision);
    /// returns how many decisions were removed.
    pub async fn purge(&self, sub: Option<&str>) -> u64 {
        let doomed: Vec<TokenDigest> = self
            .inner
            .iter()
            .filter(|(_, entry)| match (sub, &entry.decision) {
                (None, _) => true,
                (Some(s), Ok(p)) => p.sub.as_deref() == Some(s),
                (Some(_), Err(_)) => false,
            })
            .map(|(k, _)| *k)
            .collect();
        let mut purged = 0;
        for key in doomed {
            if self.inner.remove(&key).await.is_some() {
                purged += 1;
            }
        }
        purged
    }

    /// Forgets the decision about the token whose digest is `key`.
    pub async fn forget(&self, key: &TokenDigest) {
        self.inner.invalidate(key).await;
    }

    /// Applies pending evictions, so that [`DecisionCache::len`] is exact (tests).
    #[cfg(test)]
    pub async fn run_pending_tasks(&self) {
        self.inner.run_pending_tasks().await;
    }

    /// Number of remembered decisions (approximate).
    pub fn len(&self) -> u64 {
        self.inner.entry_count()
    }

    /// True when nothing is remembered (approximate, like [`DecisionCache::len`]).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::RejectReason;

    fn ok(exp: u64) -> Result<Principal, InboundError> {
        Ok(Principal {
            sub: Some("s".into()),
            expires_at: Some(exp),
            trusted_until: None,
            key_epoch: 0,
            profile: 0,
        })
    }

    #[test]
    fn digest_differs_for_different_tokens() {
        assert_ne!(digest("a.b.c"), digest("a.b.d"));
        assert_eq!(digest("a.b.c"), digest("a.b.c"));
    }

    #[tokio::test]
    async fn accepted_token_is_not_served_after_its_expiry() {
        let cache = DecisionCache::new(10, 30);
        let key = digest("t");
        cache.insert(key, ok(1000), Duration::from_secs(3600)).await;
        assert_eq!(cache.get(&key, 1029).await, Some(ok(1000)));
        assert_eq!(cache.get(&key, 1030).await, None, "past exp + leeway");
        assert_eq!(
            cache.get(&key, 1000).await,
            None,
            "and the stale entry is gone"
        );
    }

    #[tokio::test]
    async fn remembered_rejections_are_served_until_their_ttl() {
        let cache = DecisionCache::new(10, 0);
        let key = digest("t");
        let audience = Err(InboundError::Rejected {
            reason: RejectReason::Audience,
            description: "wrong audience",
        });
        cache
            .insert(key, audience.clone(), Duration::from_secs(60))
            .await;
        assert_eq!(cache.get(&key, i64::MAX).await, Some(audience));
    }

    #[tokio::test]
    async fn entries_expire_after_their_own_ttl() {
        let cache = DecisionCache::new(10, 0);
        cache
            .insert(digest("short"), ok(u64::MAX), Duration::from_millis(20))
            .await;
        cache
            .insert(digest("long"), ok(u64::MAX), Duration::from_secs(3600))
            .await;
        tokio::time::sleep(Duration::from_millis(40)).await;
        assert_eq!(cache.get(&digest("short"), 0).await, None);
        assert!(cache.get(&digest("long"), 0).await.is_some());
    }

    #[tokio::test]
    async fn failed_init_is_not_remembered_and_concurrent_callers_share_one_init() {
        let cache = Arc::new(DecisionCache::new(10, 0));
        let key = digest("opaque");
        let r = cache
            .get_or_try_insert_with(key, 0, async { Err(InboundError::Unavailable) })
            .await;
        assert_eq!(r, Err(InboundError::Unavailable));
        let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..20 {
            let (cache, calls) = (Arc::clone(&cache), Arc::clone(&calls));
            tasks.push(tokio::spawn(async move {
                cache
                    .get_or_try_insert_with(key, 0, async {
                        calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        Ok(Entry {
                            decision: ok(100),
                            ttl: Duration::from_secs(60),
                        })
                    })
                    .await
            }));
        }
        for t in tasks {
            assert_eq!(t.await.expect("task"), ok(100));
        }
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn bounded_by_max_entries() {
        let cache = DecisionCache::new(100, 0);
        for i in 0..1000 {
            cache
                .insert(
                    digest(&i.to_string()),
                    ok(u64::MAX),
                    Duration::from_secs(60),
                )
                .await;
        }
        cache.inner.run_pending_tasks().await;
        assert!(cache.len() <= 100, "{}", cache.len());
    }
}
