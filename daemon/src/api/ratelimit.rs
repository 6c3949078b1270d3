//! Per-identity token buckets (`limits.rate_limit_per_second`,
//! `limits.rate_limit_burst`).
//!
//! Keyed by the certificate's URI SAN (on the public log listener and the
//! witness, by the peer's address: [`peer_key`]), so one misbehaving
//! client cannot starve the others, however many connections it opens.
//! Buckets of keys that have been quiet long enough to be full again carry
//! no information and are dropped when the table grows (each time it has
//! doubled since, so that the scan costs O(1) a new key). The table holds
//! at most [`MAX_KEYS`]: beyond, new keys share one bucket until pruning
//! makes room (at most once a second once there), so that many addresses
//! (an IPv6 prefix's /64s) cannot grow it without bound or make each new
//! one scan it whole, while the keys already held keep their own.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Above this many keys, full buckets are pruned.
const PRUNE_ABOVE: usize = 4096;

/// The most keys with a bucket of their own (about 6 MiB of table).
pub const MAX_KEYS: usize = 1 << 16;

/// The bucket new keys share while the table is full. No identity or
/// address is empty.
const SHARED: &str = "";

/// A token-bucket rate limiter per identity.
#[derive(Debug)]
pub struct RateLimiter {
    per_second: f64,
    burst: f64,
    table: Mutex<Table>,
}

#[derive(Debug)]
struct Table {
    buckets: HashMap<String, Bucket>,
    /// Pruned when a new key comes with more buckets than this.
    prune_above: usize,
    /// When it was last pruned with the table full.
    pruned_full: Option<Instant>,
    /// Prunes so far (for the tests).
    prunes: u64,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl RateLimiter {
    /// `per_second` tokens are added per second up to `burst`; each request
    /// takes one.
    pub fn new(per_second: f64, burst: u32) -> Self {
        RateLimiter {
            per_second,
            burst: f64::from(burst.max(1)),
            table: Mutex::new(Table {
                buckets: HashMap::new(),
                prune_above: PRUNE_ABOVE,
                pruned_full: None,
                prunes: 0,
            }),
        }
    }

    /// Takes a token for `identity` at `now`.
    ///
    /// # Errors
    /// How long until a token is available, when none is.
    pub fn check(&self, identity: &str, now: Instant) -> Result<(), Duration> {
        self.look(identity, now, true)
    }

    /// Whether [`Self::check`] would find a token for `identity` at `now`,
    /// taking none: for a request that may yet be refused for another
    /// reason (its certificate), which must not spend its identity's
    /// tokens.
    ///
    /// # Errors
    /// How long until a token is available, when none is.
    pub fn peek(&self, identity: &str, now: Instant) -> Result<(), Duration> {
        self.look(identity, now, false)
    }

    fn look(&self, identity: &str, now: Instant, take: bool) -> Result<(), Duration> {
        // A panic elsewhere while holding the lock cannot leave a bucket
        // half-updated in a way that matters (worst case one request's
        // accounting), so a poisoned lock is still usable.
        let mut table = self
            .table
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let table = &mut *table;
        let known = table.buckets.contains_key(identity);
        let full = table.buckets.len() >= MAX_KEYS;
        let due = !full
            || table
                .pruned_full
                .is_none_or(|at| now.saturating_duration_since(at) >= Duration::from_secs(1));
        if !known && table.buckets.len() > table.prune_above && due {
            let (rate, burst) = (self.per_second, self.burst);
            table
                .buckets
                .retain(|_, b| refill(*b, now, rate, burst).tokens < burst);
            table.prunes += 1;
            table.pruned_full = full.then_some(now);
            table.prune_above = (2 * table.buckets.len()).clamp(PRUNE_ABOVE, MAX_KEYS - 1);
        }
        let key = if !known && table.buckets.len() >= MAX_KEYS {
            SHARED
        } else {
            identity
        };
        let bucket = table.buckets.entry(key.to_string()).or_insert(Bucket {
            tokens: self.burst,
            at: now,
        });
        let mut b = refill(*bucket, now, self.per_second, self.burst);
        let result = if b.tokens >= 1.0 {
            if take {
                b.tokens -= 1.0;
            }
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - b.tokens) / self.per_second))
        };
        *bucket = b;
        result
    }
}

/// Keeps a log line that a client can cause once per request (a 429, a
/// failed handshake) from flooding the log: at most one such line a
/// second per key (the identity refused, the handshake failure's reason),
/// so that one noisy client hides neither another's lines nor a rarer,
/// more telling failure; the others are counted, and the next line written
/// for that key says how many were left out. The metrics still count every
/// one.
#[derive(Debug, Default)]
pub struct LineThrottle {
    windows: Mutex<HashMap<String, Window>>,
}

#[derive(Debug, Clone, Copy)]
struct Window {
    opened: Instant,
    left_out: u64,
}

/// How long one written line stands for the lines after it.
const LINE_WINDOW: Duration = Duration::from_secs(1);

/// Above this many keys, the windows that have closed are dropped (their
/// counts of lines left out with them: the metrics keep the totals).
const LINE_KEYS: usize = 1024;

impl LineThrottle {
    /// A throttle that has written nothing yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether to write the line for `key` at `now`: `Some(n)`, with the
    /// `n` lines for `key` left out since the last one written, or `None`
    /// (counted) within a second of it.
    pub fn admit(&self, key: &str, now: Instant) -> Option<u64> {
        // As with the buckets, a poisoned lock costs at most a count.
        let mut windows = self
            .windows
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if windows.len() >= LINE_KEYS && !windows.contains_key(key) {
            windows.retain(|_, w| now.saturating_duration_since(w.opened) < LINE_WINDOW);
            if windows.len() >= LINE_KEYS {
                // Every key had a line within the second: the next line
                // for each is written, which bounds the log as well.
                windows.clear();
            }
        }
        match windows.get_mut(key) {
            Some(w) if now.saturating_duration_since(w.opened) < LINE_WINDOW => {
                w.left_out += 1;
                None
            }
            Some(w) => {
                let left_out = w.left_out;
                *w = Window {
                    opened: now,
                    left_out: 0,
                };
                Some(left_out)
            }
            None => {
                windows.insert(
                    key.to_string(),
                    Window {
                        opened: now,
                        left_out: 0,
                    },
                );
                Some(0)
            }
        }
    }
}

fn refill(b: Bucket, now: Instant, per_second: f64, burst: f64) -> Bucket {
    let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
    Bucket {
        tokens: (b.tokens + elapsed * per_second).min(burst),
        at: now.max(b.at),
    }
}

/// Whose bucket of a rate limit an unauthenticated peer draws on (the
/// public log listener's, and `lavd witness serve`'s): its
/// IPv4 address, or its IPv6 /64 (one host usually holds a whole /64, so a
/// bucket per address would not limit it). An IPv4-mapped IPv6 address is
/// its IPv4 address.
pub fn peer_key(ip: std::net::IpAddr) -> String {
    match ip {
        std::net::IpAddr::V4(v4) => v4.to_string(),
        std::net::IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.to_string(),
            None => {
                let s = v6.segments();
                format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
            }
        },
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_public_rate_limit_keys_ipv6_peers_by_their_64() {
        let key = |s: &str| super::peer_key(s.parse().unwrap());
        assert_eq!(key("192.0.2.7"), "192.0.2.7");
        assert_eq!(key("::ffff:192.0.2.7"), "192.0.2.7");
        assert_eq!(key("2001:db8:1:2:3:4:5:6"), "2001:db8:1:2::/64");
        assert_eq!(key("2001:db8:1:2:ffff::1"), key("2001:db8:1:2::9"));
        assert_ne!(key("2001:db8:1:2::1"), key("2001:db8:1:3::1"));
    }

    use super::*;

    #[test]
    fn burst_then_refill_per_identity() {
        let limiter = RateLimiter::new(2.0, 3);
        let t0 = Instant::now();
        for _ in 0..3 {
            limiter.check("spiffe://a", t0).unwrap();
        }
        let wait = limiter.check("spiffe://a", t0).unwrap_err();
        assert_eq!(wait, Duration::from_millis(500));
        // Another identity has its own bucket.
        limiter.check("spiffe://b", t0).unwrap();
        // Half a second later one token is back, and only one.
        let t1 = t0 + Duration::from_millis(500);
        limiter.check("spiffe://a", t1).unwrap();
        assert!(limiter.check("spiffe://a", t1).is_err());
        // Refill stops at the burst size.
        let t2 = t1 + Duration::from_secs(60);
        for _ in 0..3 {
            limiter.check("spiffe://a", t2).unwrap();
        }
        assert!(limiter.check("spiffe://a", t2).is_err());
    }

    #[test]
    fn a_peek_takes_no_token() {
        let limiter = RateLimiter::new(1.0, 1);
        let t0 = Instant::now();
        for _ in 0..3 {
            limiter.peek("spiffe://a", t0).unwrap();
        }
        limiter.check("spiffe://a", t0).unwrap();
        assert_eq!(
            limiter.peek("spiffe://a", t0).unwrap_err(),
            Duration::from_secs(1)
        );
        assert!(limiter.check("spiffe://a", t0).is_err());
    }

    #[test]
    fn one_line_a_second_per_key_then_the_count_of_those_left_out() {
        let lines = LineThrottle::new();
        let t0 = Instant::now();
        assert_eq!(lines.admit("a", t0), Some(0));
        for ms in [1, 500, 999] {
            assert_eq!(lines.admit("a", t0 + Duration::from_millis(ms)), None);
        }
        // Another key is not held back by the first.
        assert_eq!(lines.admit("b", t0 + Duration::from_millis(2)), Some(0));
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(lines.admit("a", t1), Some(3));
        assert_eq!(lines.admit("a", t1), None);
        assert_eq!(lines.admit("a", t1 + Duration::from_secs(5)), Some(1));
        // Many keys at once stay bounded.
        for i in 0..3 * LINE_KEYS {
            lines.admit(&format!("k{i}"), t1);
        }
        assert!(lines.windows.lock().unwrap().len() <= LINE_KEYS);
    }

    #[test]
    fn full_buckets_are_pruned_when_the_table_grows() {
        let limiter = RateLimiter::new(1000.0, 1);
        let t0 = Instant::now();
        for i in 0..=PRUNE_ABOVE {
            limiter.check(&format!("spiffe://x/{i}"), t0).unwrap();
        }
        let later = t0 + Duration::from_secs(1);
        limiter.check("spiffe://new", later).unwrap();
        assert_eq!(limiter.table.lock().unwrap().buckets.len(), 1);
    }

    /// Keys whose buckets never fill again (a rate of one token in 1,000
    /// s, addresses from an IPv6 prefix's /64s): the table stops at
    /// `MAX_KEYS`, pruned each time it doubled, and then at most once a
    /// second, not once for each new key; new keys share one bucket
    /// meanwhile, while the keys held keep theirs. Before, the table grew
    /// with every key, and each new one scanned it whole.
    #[test]
    fn keys_that_never_fill_again_cannot_grow_the_table_without_bound() {
        let limiter = RateLimiter::new(0.001, 1);
        let t0 = Instant::now();
        for i in 0..MAX_KEYS + 10_000 {
            let _ = limiter.check(&format!("2001:db8:{i:x}::/64"), t0);
        }
        {
            let table = limiter.table.lock().unwrap();
            assert_eq!(
                table.buckets.len(),
                MAX_KEYS + 1,
                "the keys and the shared one"
            );
            // 4096 → 8192 → … → 65,535, then once at the full table.
            assert!(table.prunes <= 6, "{} prunes", table.prunes);
        }
        // The new keys shared one bucket, spent by the first of them.
        assert!(limiter.check("2001:db8:ffff:1::/64", t0).is_err());
        assert!(limiter.check("2001:db8:ffff:2::/64", t0).is_err());
        // A key held keeps its own (spent) bucket.
        assert!(limiter.check("2001:db8:0::/64", t0).is_err());
        // Once buckets are full again (1,000 s on), a new key prunes the
        // table (at most once a second) and has a bucket of its own.
        let later = t0 + Duration::from_secs(1001);
        assert!(limiter.check("2001:db8:ffff:3::/64", later).is_ok());
        let table = limiter.table.lock().unwrap();
        assert_eq!(table.buckets.len(), 1);
    }
}
