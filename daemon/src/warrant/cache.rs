//! A bounded memory of what checking a warrant's signatures and claims
//! found, so that an agency sending the same warrant with request after
//! request pays for its signature checks (an ES256 and an EdDSA
//! verification, about 165 µs together) once.
//!
//! Only the outcome of work that neither time nor the caller can change is
//! kept: the JWS parsed, every signature verified against the trust store,
//! the claims parsed, the policy met. An entry is found by the SHA-256 of
//! the exact JWS bytes. Each cache belongs to one [`super::Verifier`], and a
//! verifier to one trust generation: a reload (SIGHUP) builds a new verifier
//! with an empty cache, so an entry can never outlive the authorities and
//! policy it was checked against.
//!
//! Refusals are never kept: an entry is added only after a warrant passed
//! every check, including the ones that are made again for every request
//! (authority validity, `[not_before, usable_until)`, the agency; the
//! store's revocation and budget checks come after and never see this
//! cache). An entry is dropped when it is looked up at or after its
//! warrant's end of usability, and entries past it are the first to go when
//! the cache is full; after that the least recently used go first.
//!
//! Bounds: [`MAX_ENTRIES`] warrants and [`MAX_BYTES`] bytes, counted as
//! [`weight`] of the JWS size. A warrant heavier than the byte bound alone is
//! not kept.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use time::OffsetDateTime;

use super::claims::sha256;

/// Most warrants kept by one verifier. Real deployments execute a handful
/// of warrants at a time; past this, the least recently used is verified
/// again in full when it comes back.
pub const MAX_ENTRIES: usize = 1024;

/// Most bytes kept by one verifier, as [`weight`] counts them: 16 MiB holds
/// 31 warrants at the largest size accepted (256 KiB, 1000 targets) or the
/// full [`MAX_ENTRIES`] of small ones.
pub const MAX_BYTES: usize = 16 * 1024 * 1024;

/// What an entry for a JWS of `jws_len` bytes is counted as: the parsed
/// claims (targets twice: the list and the lookup set) hold at most about
/// twice the JWS's bytes, plus a fixed allowance for the rest.
pub fn weight(jws_len: usize) -> usize {
    jws_len.saturating_mul(2).saturating_add(1024)
}

/// The key of a JWS: SHA-256 of its exact bytes.
pub type Key = [u8; 32];

/// The key of `jws_bytes`.
pub fn key(jws_bytes: &[u8]) -> Key {
    sha256(jws_bytes)
}

/// A bounded map from [`Key`] to shared values, each usable until a time.
pub struct Cache<V> {
    inner: Mutex<Inner<V>>,
    max_entries: usize,
    max_bytes: usize,
}

impl<V> std::fmt::Debug for Cache<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache")
            .field("entries", &self.len())
            .field("max_entries", &self.max_entries)
            .field("max_bytes", &self.max_bytes)
            .finish()
    }
}

struct Inner<V> {
    map: HashMap<Key, Slot<V>>,
    bytes: usize,
    /// Counts lookups and inserts: the least recently used slot has the
    /// smallest `used`.
    clock: u64,
}

struct Slot<V> {
    value: Arc<V>,
    until: OffsetDateTime,
    weight: usize,
    used: u64,
}

impl<V> Cache<V> {
    /// An empty cache of at most `max_entries` values and `max_bytes`.
    pub fn new(max_entries: usize, max_bytes: usize) -> Self {
        Cache {
            inner: Mutex::new(Inner {
                map: HashMap::new(),
                bytes: 0,
                clock: 0,
            }),
            max_entries,
            max_bytes,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner<V>> {
        // Nothing inside the lock can panic (map operations and integer
        // arithmetic that cannot overflow), so poisoning cannot happen in
        // practice and the map is always whole.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The value under `key` if it is still usable at `now`; an entry past
    /// its time is dropped.
    pub fn get(&self, key: &Key, now: OffsetDateTime) -> Option<Arc<V>> {
        let mut inner = self.lock();
        inner.clock += 1;
        let clock = inner.clock;
        let slot = inner.map.get_mut(key)?;
        if now < slot.until {
            slot.used = clock;
            return Some(slot.value.clone());
        }
        if let Some(gone) = inner.map.remove(key) {
            inner.bytes -= gone.weight;
        }
        None
    }

    /// Keeps `value` under `key` until `until`, counted as `weight` bytes,
    /// making room first: entries past their time at `now`, then the least
    /// recently used. A value already past its time, or heavier than the
    /// whole byte bound, is not kept.
    pub fn insert(
        &self,
        key: Key,
        value: Arc<V>,
        until: OffsetDateTime,
        weight: usize,
        now: OffsetDateTime,
    ) {
        if now >= until || weight > self.max_bytes || self.max_entries == 0 {
            return;
        }
        let mut inner = self.lock();
        if let Some(old) = inner.map.remove(&key) {
            inner.bytes -= old.weight;
        }
        let full = |inner: &Inner<V>| {
            inner.map.len() >= self.max_entries || inner.bytes + weight > self.max_bytes
        };
        if full(&inner) {
            inner.map.retain(|_, slot| now < slot.until);
            inner.bytes = inner.map.values().map(|s| s.weight).sum();
        }
        while full(&inner) {
            let Some(oldest) = inner
                .map
                .iter()
                .min_by_key(|(_, slot)| slot.used)
                .map(|(k, _)| *k)
            else {
                break;
            };
            if let Some(gone) = inner.map.remove(&oldest) {
                inner.bytes -= gone.weight;
            }
        }
        inner.clock += 1;
        let used = inner.clock;
        inner.bytes += weight;
        inner.map.insert(
            key,
            Slot {
                value,
                until,
                weight,
                used,
            },
        );
    }

    /// How many values are kept.
    pub fn len(&self) -> usize {
        self.lock().map.len()
    }

    /// Whether none is kept.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bytes kept, as counted at insertion.
    pub fn bytes(&self) -> usize {
        self.lock().bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::Duration;

    fn t0() -> OffsetDateTime {
        time::macros::datetime!(2026-12-02 12:00 UTC)
    }

    #[test]
    fn the_key_is_the_exact_bytes() {
        let a = key(br#"{"payload":"x","signatures":[]}"#);
        let spaced = key(br#"{"payload": "x","signatures":[]}"#);
        assert_ne!(a, spaced, "one byte more is another warrant");
        assert_eq!(a, key(br#"{"payload":"x","signatures":[]}"#));
    }

    #[test]
    fn an_entry_is_never_returned_at_or_after_its_time() {
        let cache = Cache::new(8, 1 << 20);
        let until = t0() + Duration::seconds(10);
        cache.insert([1; 32], Arc::new("w"), until, 100, t0());
        assert_eq!(cache.get(&[1; 32], t0()).as_deref(), Some(&"w"));
        assert_eq!(
            cache
                .get(&[1; 32], until - Duration::nanoseconds(1))
                .as_deref(),
            Some(&"w")
        );
        assert!(cache.get(&[1; 32], until).is_none());
        // ...and it is gone, not just hidden.
        assert!(cache.is_empty());
        assert_eq!(cache.bytes(), 0);
        assert!(cache.get(&[1; 32], t0()).is_none());
        // Already past its time: not kept at all.
        cache.insert([2; 32], Arc::new("late"), t0(), 100, t0());
        assert!(cache.is_empty());
    }

    #[test]
    fn the_entry_bound_evicts_the_least_recently_used() {
        let cache = Cache::new(3, 1 << 20);
        let until = t0() + Duration::hours(1);
        for i in 1..=3u8 {
            cache.insert([i; 32], Arc::new(i), until, 10, t0());
        }
        // 1 is used again, so 2 is now the least recently used.
        assert!(cache.get(&[1; 32], t0()).is_some());
        cache.insert([4; 32], Arc::new(4), until, 10, t0());
        assert_eq!(cache.len(), 3);
        assert!(cache.get(&[2; 32], t0()).is_none());
        for i in [1u8, 3, 4] {
            assert_eq!(cache.get(&[i; 32], t0()).as_deref(), Some(&i));
        }
        assert_eq!(cache.bytes(), 30);
    }

    #[test]
    fn expired_entries_go_before_recently_used_ones() {
        let cache = Cache::new(2, 1 << 20);
        cache.insert([1; 32], Arc::new(1u8), t0() + Duration::hours(1), 10, t0());
        cache.insert(
            [2; 32],
            Arc::new(2u8),
            t0() + Duration::seconds(5),
            10,
            t0(),
        );
        // 2 is the most recently used, but its time is over at `later`.
        assert!(cache.get(&[2; 32], t0()).is_some());
        let later = t0() + Duration::seconds(6);
        cache.insert([3; 32], Arc::new(3u8), t0() + Duration::hours(1), 10, later);
        assert_eq!(cache.len(), 2);
        assert!(cache.get(&[1; 32], later).is_some());
        assert!(cache.get(&[3; 32], later).is_some());
    }

    #[test]
    fn the_byte_bound_holds_and_an_oversized_value_is_not_kept() {
        let cache = Cache::new(100, 1000);
        let until = t0() + Duration::hours(1);
        for i in 0..10u8 {
            cache.insert([i; 32], Arc::new(i), until, 300, t0());
            assert!(cache.bytes() <= 1000, "{}", cache.bytes());
        }
        assert_eq!(cache.len(), 3);
        // The newest three remain.
        for i in 7..10u8 {
            assert!(cache.get(&[i; 32], t0()).is_some());
        }
        cache.insert([42; 32], Arc::new(42), until, 1001, t0());
        assert!(cache.get(&[42; 32], t0()).is_none());
        assert_eq!(cache.len(), 3, "an oversized value evicts nothing");
        // Replacing a key does not count it twice.
        cache.insert([9; 32], Arc::new(9), until, 300, t0());
        assert_eq!(cache.bytes(), 900);
    }

    #[test]
    fn the_weight_grows_with_the_warrant() {
        assert!(weight(256 * 1024) * 31 <= MAX_BYTES);
        assert!(weight(1000) * MAX_ENTRIES <= MAX_BYTES);
        assert_eq!(weight(usize::MAX), usize::MAX);
    }
}
