//! Where exchanged tokens are kept: a bounded map from [`CacheKey`] to [`CachedToken`],
//! split into shards, plus the single-flight bookkeeping for keys being exchanged.
//!
//! **Why not a general-purpose cache.** An entry here is the issued token (about 1 KB for a
//! Keycloak access token) and a hundred bytes of deadlines. A general-purpose concurrent cache
//! with frequency sketches, access-order queues and a timer wheel spends about 590 bytes of
//! bookkeeping per entry on top of that (measured with moka 0.12: entry, key and value boxes,
//! queue and timer nodes), and several hundred instructions per lookup. Every entry here
//! already carries its own deadline, and the map only needs three things: a lookup on the hot
//! path, a bound on its size, and a way to let expired entries go. A sharded `HashMap` does
//! that with a 128-byte slot per entry (about 170 bytes with the table's spare room) and one
//! uncontended lock per lookup (77 ns against moka's 450 in `cargo bench --bench hot_path`).
//!
//! **Expiry.** An entry is served only while [`CachedToken::is_servable`]; expired entries are
//! dropped by [`Store::purge_expired`] (run periodically by the exchanger), and by an insert
//! into a full shard before anything live is evicted.
//!
//! **Bound.** The store counts its entries; an insert that takes it past `max_entries` makes
//! room, in its own shard if it can, else in the next ones: it drops the shard's expired
//! entries, or if none, evicts, of a handful of entries sampled in table order (which follows
//! the keys' hashes, so is effectively random), the one whose serving window ends first.
//! Concurrent inserts can overshoot by one entry each, for the moment between their insert
//! and their eviction.
//!
//! **Single flight.** [`Store::flight`] hands every caller for a key the same [`Flight`] while
//! one is in progress; the first caller runs the exchange in it and the others wait for its
//! result (`tokio::sync::OnceCell`: if the caller running it goes away, the next waiter runs
//! its own). A flight leaves the map as soon as it has a result, so a failure is seen only by
//! the callers that waited for it, and the next request tries again.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::time::Instant;

use super::ExchangeError;
use super::cache::{CacheKey, CachedToken, KeyHasherBuilder};

/// Shards for a store of `max_entries`: one per this many entries, a power of two.
const ENTRIES_PER_SHARD: u64 = 1024;
/// At most this many shards: enough that worker threads rarely meet on one lock.
const MAX_SHARDS: usize = 64;
/// Entries looked at when a full shard with nothing expired must evict one.
const EVICTION_SAMPLE: usize = 8;

/// One exchange in progress for a key, shared by every caller that waits for it.
pub(crate) type Flight = tokio::sync::OnceCell<Result<CachedToken, ExchangeError>>;

type Shard = HashMap<CacheKey, CachedToken, KeyHasherBuilder>;

/// See the module documentation.
pub(crate) struct Store {
    shards: Box<[Mutex<Shard>]>,
    /// `shards.len() - 1`; the shard of a key is its first eight bytes masked by this.
    shard_mask: usize,
    /// Most entries kept (zero: nothing is kept).
    capacity: usize,
    /// Entries kept, over all shards.
    len: AtomicUsize,
    flights: Mutex<HashMap<CacheKey, Arc<Flight>, KeyHasherBuilder>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("shards", &self.shards.len())
            .field("capacity", &self.capacity)
            .field("entries", &self.len())
            .finish_non_exhaustive()
    }
}

impl Store {
    /// An empty store that keeps at most about `max_entries` entries.
    pub(crate) fn new(max_entries: u64) -> Self {
        let shards = usize::try_from(max_entries / ENTRIES_PER_SHARD)
            .unwrap_or(MAX_SHARDS)
            .clamp(1, MAX_SHARDS)
            .next_power_of_two()
            .min(MAX_SHARDS);
        let hasher = KeyHasherBuilder::new();
        Self {
            shards: (0..shards)
                .map(|_| Mutex::new(HashMap::with_hasher(hasher.clone())))
                .collect(),
            shard_mask: shards - 1,
            capacity: usize::try_from(max_entries).unwrap_or(usize::MAX),
            len: AtomicUsize::new(0),
            flights: Mutex::new(HashMap::with_hasher(hasher)),
        }
    }

    /// The entry for `key`, whatever its deadlines (the caller judges them).
    pub(crate) fn get(&self, key: &CacheKey) -> Option<CachedToken> {
        self.shard(key).get(key).cloned()
    }

    /// Keeps `entry` for `key`, replacing what was there, unless it is not servable at `now`
    /// (an exchange with an empty window is used, not kept) or the store keeps nothing.
    pub(crate) fn insert(&self, key: CacheKey, entry: CachedToken, now: Instant) {
        if !entry.is_servable(now) || self.capacity == 0 {
            return;
        }
        let index = self.shard_index(&key);
        let mut shard = lock(&self.shards[index]);
        if shard.insert(key, entry).is_some() {
            return; // replaced: no more entries than before
        }
        if self.len.fetch_add(1, Ordering::Relaxed) < self.capacity {
            return;
        }
        // Over the bound by this entry: make room here, else in the next shards.
        let mut removed = self.make_room(&mut shard, now, Some(&key));
        drop(shard);
        for step in 1..self.shards.len() {
            if removed > 0 {
                break;
            }
            let mut other = lock(&self.shards[(index + step) & self.shard_mask]);
            removed = self.make_room(&mut other, now, None);
        }
    }

    /// Drops the shard's expired entries, or if none, evicts of a few sampled entries (never
    /// `keep`) the one that would stop being served first; returns how many went.
    fn make_room(&self, shard: &mut Shard, now: Instant, keep: Option<&CacheKey>) -> usize {
        let mut removed = self.drop_expired(shard, now);
        if removed == 0 {
            let victim = shard
                .iter()
                .filter(|(k, _)| Some(*k) != keep)
                .take(EVICTION_SAMPLE)
                .min_by_key(|(_, e)| e.serve_until)
                .map(|(k, _)| *k);
            if let Some(k) = victim {
                shard.remove(&k);
                self.len.fetch_sub(1, Ordering::Relaxed);
                removed = 1;
            }
        }
        removed
    }

    /// Drops the shard's entries not servable at `now`; returns how many went.
    fn drop_expired(&self, shard: &mut Shard, now: Instant) -> usize {
        let before = shard.len();
        shard.retain(|_, e| e.is_servable(now));
        let removed = before - shard.len();
        self.len.fetch_sub(removed, Ordering::Relaxed);
        removed
    }

    /// Removes the entry for `key` if `stale` says so of it.
    pub(crate) fn remove_if(&self, key: &CacheKey, stale: impl FnOnce(&CachedToken) -> bool) {
        let mut shard = self.shard(key);
        if shard.get(key).is_some_and(stale) {
            shard.remove(key);
            self.len.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Drops every entry not servable at `now`, one shard at a time.
    pub(crate) fn purge_expired(&self, now: Instant) {
        for shard in &*self.shards {
            self.drop_expired(&mut lock(shard), now);
        }
    }

    /// Entries kept, expired ones not yet purged included.
    pub(crate) fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    /// The flight for `key`: the one in progress, or a new one. Hold the guard while waiting
    /// on it; dropping the guard ends the flight's place in the map once it has a result or
    /// nobody else holds it.
    pub(crate) fn flight(&self, key: CacheKey) -> FlightGuard<'_> {
        let flight = lock(&self.flights).entry(key).or_default().clone();
        FlightGuard {
            store: self,
            key,
            flight,
        }
    }

    fn shard(&self, key: &CacheKey) -> MutexGuard<'_, Shard> {
        lock(&self.shards[self.shard_index(key)])
    }

    fn shard_index(&self, key: &CacheKey) -> usize {
        let mut first = [0u8; 8];
        first.copy_from_slice(&key[..8]);
        // Truncation is the point: the low bits pick the shard.
        u64::from_le_bytes(first) as usize & self.shard_mask
    }
}

/// A caller's hold on a [`Flight`]; see [`Store::flight`].
pub(crate) struct FlightGuard<'a> {
    store: &'a Store,
    key: CacheKey,
    flight: Arc<Flight>,
}

impl std::ops::Deref for FlightGuard<'_> {
    type Target = Flight;

    fn deref(&self) -> &Flight {
        &self.flight
    }
}

impl Drop for FlightGuard<'_> {
    fn drop(&mut self) {
        let mut flights = lock(&self.store.flights);
        let ours = flights
            .get(&self.key)
            .is_some_and(|f| Arc::ptr_eq(f, &self.flight));
        // Clones are made only under this lock, so a count of two (the map's and ours) means
        // no other caller holds this flight: it was abandoned before finishing.
        if ours && (self.flight.initialized() || Arc::strong_count(&self.flight) == 2) {
            flights.remove(&self.key);
        }
    }
}

/// A poisoned lock only means another thread panicked while holding it; the map itself is
/// never left half-updated by the operations above, so keep using it.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use http::HeaderValue;

    use super::*;

    fn entry(window_secs: u64, now: Instant) -> CachedToken {
        CachedToken::new(
            HeaderValue::from_static("Bearer issued"),
            Duration::from_secs(window_secs),
            now,
        )
    }

    fn key(n: u32) -> CacheKey {
        // Spread over the shards the way digests are.
        let mut k = [0u8; 32];
        k[..8].copy_from_slice(
            &u64::from(n)
                .wrapping_mul(0x9e37_79b9_7f4a_7c15)
                .to_le_bytes(),
        );
        k[28..].copy_from_slice(&n.to_le_bytes());
        k
    }

    #[test]
    fn a_slot_stays_small() {
        // Key and entry as the map stores them; see the module documentation.
        let slot = std::mem::size_of::<(CacheKey, CachedToken)>();
        assert!(slot <= 128, "{slot} bytes");
    }

    #[test]
    fn shards_are_a_power_of_two() {
        for (max, shards) in [
            (0, 1),
            (10, 1),
            (1024, 1),
            (5000, 4),
            (100_000, 64),
            (u64::MAX, 64),
        ] {
            assert_eq!(Store::new(max).shards.len(), shards, "max_entries {max}");
        }
    }

    #[tokio::test]
    async fn an_entry_with_no_time_left_is_not_kept() {
        let s = Store::new(100);
        let now = Instant::now();
        s.insert(key(1), entry(0, now), now);
        assert!(s.get(&key(1)).is_none());
        assert_eq!(s.len(), 0);
    }

    #[tokio::test]
    async fn a_store_of_zero_entries_keeps_nothing() {
        let s = Store::new(0);
        let now = Instant::now();
        s.insert(key(1), entry(60, now), now);
        assert_eq!(s.len(), 0);
    }

    #[tokio::test]
    async fn a_full_shard_drops_expired_entries_before_live_ones() {
        let s = Store::new(4);
        let now = Instant::now();
        s.insert(key(1), entry(10, now), now);
        s.insert(key(2), entry(100, now), now);
        s.insert(key(3), entry(100, now), now);
        s.insert(key(4), entry(100, now), now);
        let later = now + Duration::from_secs(20);
        s.insert(key(5), entry(100, later), later);
        assert!(s.get(&key(1)).is_none(), "the expired entry made room");
        for n in 2..=5 {
            assert!(s.get(&key(n)).is_some(), "entry {n} kept");
        }
    }

    #[tokio::test]
    async fn a_full_shard_evicts_the_entry_ending_first() {
        let s = Store::new(4);
        let now = Instant::now();
        for (n, secs) in [(1, 300), (2, 30), (3, 300), (4, 300)] {
            s.insert(key(n), entry(secs, now), now);
        }
        s.insert(key(5), entry(300, now), now);
        assert_eq!(s.len(), 4, "bounded");
        assert!(s.get(&key(2)).is_none(), "the one ending first went");
        assert!(s.get(&key(5)).is_some());
        // Replacing a kept key needs no room.
        s.insert(key(5), entry(200, now), now);
        assert_eq!(s.len(), 4);
    }

    #[tokio::test]
    async fn the_bound_holds_over_many_inserts() {
        let s = Store::new(5000);
        let now = Instant::now();
        for n in 0..20_000 {
            s.insert(key(n), entry(60, now), now);
        }
        assert_eq!(s.len(), 5000);
        let counted: usize = s.shards.iter().map(|m| lock(m).len()).sum();
        assert_eq!(counted, 5000, "the count is the entries");
    }

    #[tokio::test]
    async fn a_full_store_makes_room_in_another_shard_when_its_own_has_none() {
        let s = Store::new(4096); // four shards
        assert_eq!(s.shards.len(), 4);
        let now = Instant::now();
        let mut n = 0;
        let mut in_shard_zero = Vec::new();
        while in_shard_zero.len() < 4096 {
            if s.shard_index(&key(n)) == 0 {
                in_shard_zero.push(key(n));
            }
            n += 1;
        }
        for k in &in_shard_zero {
            s.insert(*k, entry(60, now), now);
        }
        assert_eq!(s.len(), 4096);
        let elsewhere = (n..)
            .map(key)
            .find(|k| s.shard_index(k) == 1)
            .expect("a key");
        s.insert(elsewhere, entry(60, now), now);
        assert_eq!(s.len(), 4096, "bounded");
        assert!(s.get(&elsewhere).is_some(), "the new entry is kept");
        assert_eq!(
            lock(&s.shards[0]).len(),
            4095,
            "room was made in the full shard"
        );
    }

    #[tokio::test]
    async fn purge_drops_only_expired_entries() {
        let s = Store::new(100);
        let now = Instant::now();
        s.insert(key(1), entry(10, now), now);
        s.insert(key(2), entry(60, now), now);
        s.purge_expired(now + Duration::from_secs(30));
        assert!(s.get(&key(1)).is_none());
        assert!(s.get(&key(2)).is_some());
        assert_eq!(s.len(), 1);
    }

    #[tokio::test]
    async fn remove_if_removes_only_what_the_predicate_names() {
        let s = Store::new(100);
        let now = Instant::now();
        s.insert(key(1), entry(60, now), now);
        s.remove_if(&key(1), |_| false);
        assert!(s.get(&key(1)).is_some());
        assert_eq!(s.len(), 1);
        s.remove_if(&key(1), |e| e.is_servable(now));
        assert!(s.get(&key(1)).is_none());
        assert_eq!(s.len(), 0, "counted out");
        s.remove_if(&key(2), |_| panic!("no entry, no call"));
    }

    #[tokio::test]
    async fn callers_share_a_flight_until_it_has_a_result() {
        let s = Store::new(100);
        let now = Instant::now();
        let a = s.flight(key(1));
        let b = s.flight(key(1));
        assert!(Arc::ptr_eq(&a.flight, &b.flight), "one flight per key");
        let other = s.flight(key(2));
        assert!(!Arc::ptr_eq(&a.flight, &other.flight));
        drop(other);

        let got = a.get_or_init(|| async { Ok(entry(60, now)) }).await;
        assert!(got.is_ok());
        let waited = b
            .get_or_init(|| async { panic!("the flight already has a result") })
            .await;
        assert!(waited.is_ok());
        drop(a);
        // Finished: the next caller starts a new flight (and retries after a failure).
        let c = s.flight(key(1));
        assert!(!Arc::ptr_eq(&c.flight, &b.flight));
        drop(b);
        drop(c);
        assert!(lock(&s.flights).is_empty(), "no flight left behind");
    }

    #[tokio::test]
    async fn an_abandoned_flight_leaves_the_map() {
        let s = Store::new(100);
        let waiting = {
            let g = s.flight(key(1));
            // Started and dropped before a result, as when the client goes away.
            let pending = g.get_or_init(std::future::pending);
            tokio::time::timeout(Duration::from_millis(1), pending)
                .await
                .is_err()
        };
        assert!(waiting);
        assert!(lock(&s.flights).is_empty());

        // Abandoned while another caller still waits: kept for that caller, who runs it.
        let a = s.flight(key(1));
        let b = s.flight(key(1));
        drop(a);
        assert_eq!(lock(&s.flights).len(), 1);
        let now = Instant::now();
        assert!(b.get_or_init(|| async { Ok(entry(60, now)) }).await.is_ok());
        drop(b);
        assert!(lock(&s.flights).is_empty());
    }
}
