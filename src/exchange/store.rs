//! Where exchanged tokens are kept: a bounded [`moka`] cache from [`CacheKey`] to
//! [`CachedToken`].
//!
//! - **Lifetime.** Each entry leaves the cache at the end of its own lifetime (moka's
//!   per-entry [`Expiry`]); until then it is served only while [`CachedToken::is_servable`],
//!   which reads the entry's deadline on the tokio clock, so paused-clock tests govern what is
//!   served even though moka keeps its own clock.
//! - **Bound.** At most `cache.max_entries`, least recently used evicted first. Plain LRU
//!   rather than moka's default TinyLFU admission: a token seen for the first time must be
//!   kept, or its second request would call the IdP again.
//! - **Single flight.** Concurrent misses for one key, and a refresh ahead of an entry's end,
//!   make one exchange ([`Store::flight`], moka's `try_get_with` on a second cache that keeps
//!   nothing, so that a key still holding a stale entry is coalesced too): the other callers
//!   wait for it and get its result, a failure included; a failure is never kept here.
//!
//! [`Refusals`] keeps the IdP's refusals of subject tokens apart, for `exchange.negative_ttl`.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use moka::Expiry;
use moka::future::Cache;
use moka::ops::compute::Op;
use moka::policy::EvictionPolicy;
use tokio::time::Instant;

use super::ExchangeError;
use super::cache::{CacheKey, CachedToken, KeyHasherBuilder};

/// Keeps nothing: the flights cache only coalesces.
struct NotKept;

impl Expiry<CacheKey, CachedToken> for NotKept {
    fn expire_after_create(
        &self,
        _: &CacheKey,
        _: &CachedToken,
        _: std::time::Instant,
    ) -> Option<Duration> {
        Some(Duration::ZERO)
    }
}

/// Gives every entry the rest of its own lifetime, on the tokio clock.
struct UntilTheEntryEnds;

impl UntilTheEntryEnds {
    fn remaining(value: &CachedToken) -> Option<Duration> {
        Some(value.lifetime_end.saturating_duration_since(Instant::now()))
    }
}

impl Expiry<CacheKey, CachedToken> for UntilTheEntryEnds {
    fn expire_after_create(
        &self,
        _: &CacheKey,
        value: &CachedToken,
        _: std::time::Instant,
    ) -> Option<Duration> {
        Self::remaining(value)
    }

    fn expire_after_update(
        &self,
        _: &CacheKey,
        value: &CachedToken,
        _: std::time::Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Self::remaining(value)
    }
}

/// The IdP's refusals of subject tokens (401/403 outcomes), each remembered for
/// `exchange.negative_ttl`, so that a client retrying a refused token costs no IdP call.
pub(crate) struct Refusals {
    inner: Option<Cache<CacheKey, (ExchangeError, Instant), KeyHasherBuilder>>,
    ttl: Duration,
}

impl std::fmt::Debug for Refusals {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Refusals").field("ttl", &self.ttl).finish()
    }
}

impl Refusals {
    /// At most `max_entries` refusals, each for `ttl` (zero: none is kept).
    pub(crate) fn new(max_entries: u64, ttl: Duration) -> Self {
        let inner = (!ttl.is_zero()).then(|| {
            Cache::builder()
                .max_capacity(max_entries)
                .time_to_live(ttl)
                .build_with_hasher(KeyHasherBuilder::new())
        });
        Self { inner, ttl }
    }

    /// The refusal remembered for `key`, if it still holds at `now` (tokio clock).
    pub(crate) async fn get(&self, key: &CacheKey, now: Instant) -> Option<ExchangeError> {
        let (error, until) = self.inner.as_ref()?.get(key).await?;
        (now < until).then_some(error)
    }

    /// Remembers `error` for `key` from `now`.
    pub(crate) async fn insert(&self, key: CacheKey, error: ExchangeError, now: Instant) {
        if let Some(inner) = &self.inner {
            inner.insert(key, (error, now + self.ttl)).await;
        }
    }
}

/// See the module documentation.
pub(crate) struct Store {
    inner: Cache<CacheKey, CachedToken, KeyHasherBuilder>,
    /// Exchanges in flight, by key (entries are never kept: moka's coalescing is the point).
    flights: Cache<CacheKey, CachedToken, KeyHasherBuilder>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("entries", &self.inner.entry_count())
            .finish_non_exhaustive()
    }
}

impl Store {
    /// An empty store that keeps at most `max_entries` entries.
    pub(crate) fn new(max_entries: u64) -> Self {
        Self {
            inner: Cache::builder()
                .max_capacity(max_entries)
                .eviction_policy(EvictionPolicy::lru())
                .expire_after(UntilTheEntryEnds)
                .build_with_hasher(KeyHasherBuilder::new()),
            flights: Cache::builder()
                .expire_after(NotKept)
                .build_with_hasher(KeyHasherBuilder::new()),
        }
    }

    /// The entry for `key`, servable or not.
    pub(crate) async fn get(&self, key: &CacheKey) -> Option<CachedToken> {
        self.inner.get(key).await
    }

    /// Keeps `entry` under `key`, replacing any other.
    pub(crate) async fn insert(&self, key: CacheKey, entry: CachedToken) {
        self.inner.insert(key, entry).await;
    }

    /// Keeps `fresh` under `key` unless the entry there now serves at least as long (a
    /// concurrent exchange finished first); a token with no serving window is not kept.
    pub(crate) async fn keep(&self, key: CacheKey, fresh: CachedToken, now: Instant) {
        if !fresh.is_servable(now) {
            return;
        }
        self.inner
            .entry(key)
            .and_compute_with(|found| async move {
                match found {
                    Some(e) if e.value().serve_until >= fresh.serve_until => Op::Nop,
                    _ => Op::Put(fresh),
                }
            })
            .await;
    }

    /// The result of `exchange` for `key`: concurrent callers for one key wait for one
    /// `exchange` and share its result, a failure included. Nothing is kept here: `exchange`
    /// keeps what it got ([`Store::keep`]).
    pub(crate) async fn flight(
        &self,
        key: CacheKey,
        exchange: impl Future<Output = Result<CachedToken, ExchangeError>>,
    ) -> Result<CachedToken, Arc<ExchangeError>> {
        self.flights.try_get_with(key, exchange).await
    }

    /// Removes the entries whose client token's `sub` is `sub` (`None`: every entry); returns
    /// how many were removed.
    pub(crate) async fn purge(&self, sub: Option<&str>) -> u64 {
        let doomed: Vec<CacheKey> = self
            .inner
            .iter()
            .filter(|(_, e)| sub.is_none_or(|s| e.sub.as_deref() == Some(s)))
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

    /// Removes the entry for `key`.
    pub(crate) async fn forget(&self, key: &CacheKey) {
        self.inner.invalidate(key).await;
    }

    /// Entries kept (moka's count: up to date after [`Store::sync`]).
    pub(crate) fn len(&self) -> u64 {
        self.inner.entry_count()
    }

    /// Applies pending evictions and expiries, so that [`Store::len`] is exact.
    pub(crate) async fn sync(&self) {
        self.inner.run_pending_tasks().await;
    }
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    fn entry(window: Duration, lifetime: Duration) -> CachedToken {
        CachedToken::new(
            HeaderValue::from_static("Bearer x"),
            window,
            lifetime,
            Instant::now(),
        )
    }

    fn key(n: u8) -> CacheKey {
        [n; 32]
    }

    #[tokio::test]
    async fn the_store_is_bounded_least_recently_used_first() {
        let store = Store::new(2);
        let long = Duration::from_secs(60);
        store.insert(key(1), entry(long, long)).await;
        store.insert(key(2), entry(long, long)).await;
        store.sync().await;
        // Key 1 is used, so key 2 is the least recently used one.
        assert!(store.get(&key(1)).await.is_some());
        store.sync().await;
        store.insert(key(3), entry(long, long)).await;
        store.sync().await;
        assert_eq!(store.len(), 2);
        assert!(store.get(&key(1)).await.is_some());
        assert!(store.get(&key(2)).await.is_none(), "evicted");
        assert!(
            store.get(&key(3)).await.is_some(),
            "a new key is always admitted"
        );
    }

    #[tokio::test]
    async fn an_entry_leaves_at_the_end_of_its_lifetime() {
        let store = Store::new(10);
        store
            .insert(
                key(1),
                entry(Duration::from_millis(50), Duration::from_millis(100)),
            )
            .await;
        assert!(store.get(&key(1)).await.is_some());
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert!(
            store.get(&key(1)).await.is_none(),
            "never served after its end"
        );
        // Its memory goes with the next turn of moka's timer wheel (about a second).
        let mut gone = false;
        for _ in 0..60 {
            store.sync().await;
            if store.len() == 0 {
                gone = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(gone, "the expired entry is still counted");
    }

    #[tokio::test]
    async fn an_entry_without_a_lifetime_is_never_kept() {
        let store = Store::new(10);
        store
            .insert(key(1), entry(Duration::ZERO, Duration::ZERO))
            .await;
        assert!(store.get(&key(1)).await.is_none());
    }

    #[tokio::test]
    async fn keep_never_replaces_a_longer_entry() {
        let store = Store::new(10);
        let now = Instant::now();
        let (short, long) = (Duration::from_secs(5), Duration::from_secs(50));
        store.keep(key(1), entry(long, long), now).await;
        store.keep(key(1), entry(short, short), now).await;
        let kept = store.get(&key(1)).await.expect("kept");
        assert!(kept.serve_until > now + short * 2, "the longer entry stays");
        store
            .keep(key(1), entry(long * 2, long * 2), Instant::now())
            .await;
        let kept = store.get(&key(1)).await.expect("kept");
        assert!(kept.serve_until > now + long, "a longer one replaces it");
        store
            .keep(key(2), entry(Duration::ZERO, long), Instant::now())
            .await;
        assert!(store.get(&key(2)).await.is_none(), "no window, not kept");
    }

    #[tokio::test]
    async fn concurrent_misses_share_one_exchange_and_a_failure_is_not_kept() {
        let store = Arc::new(Store::new(10));
        let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut waiters = Vec::new();
        for _ in 0..20 {
            let (store, calls) = (store.clone(), calls.clone());
            waiters.push(tokio::spawn(async move {
                store
                    .flight(key(7), async {
                        calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        Err(ExchangeError::InvalidResponse)
                    })
                    .await
            }));
        }
        for w in waiters {
            let result = w.await.expect("task");
            assert_eq!(
                result.map_err(|e| (*e).clone()).err(),
                Some(ExchangeError::InvalidResponse)
            );
        }
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert!(
            store.get(&key(7)).await.is_none(),
            "the failure is not kept"
        );
        let long = Duration::from_secs(60);
        let ok = store.flight(key(7), async { Ok(entry(long, long)) }).await;
        assert!(ok.is_ok(), "the next caller tries again");
        assert!(
            store.get(&key(7)).await.is_none(),
            "a flight keeps nothing by itself"
        );
    }
}
