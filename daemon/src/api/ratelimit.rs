//! Per-identity token buckets (`limits.rate_limit_per_second`,
//! `limits.rate_limit_burst`).
//!
//! Keyed by the certificate's URI SAN, so one misbehaving client cannot
//! starve the others, however many connections it opens. Buckets of
//! identities that have been quiet long enough to be full again carry no
//! information and are dropped when the table grows, so a CA that issues
//! many identities cannot grow it without bound.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Above this many identities, full buckets are pruned.
const PRUNE_ABOVE: usize = 4096;

/// A token-bucket rate limiter per identity.
#[derive(Debug)]
pub struct RateLimiter {
    per_second: f64,
    burst: f64,
    buckets: Mutex<HashMap<String, Bucket>>,
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
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes a token for `identity` at `now`.
    ///
    /// # Errors
    /// How long until a token is available, when none is.
    pub fn check(&self, identity: &str, now: Instant) -> Result<(), Duration> {
        // A panic elsewhere while holding the lock cannot leave a bucket
        // half-updated in a way that matters (worst case one request's
        // accounting), so a poisoned lock is still usable.
        let mut buckets = self
            .buckets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if buckets.len() > PRUNE_ABOVE && !buckets.contains_key(identity) {
            let (rate, burst) = (self.per_second, self.burst);
            buckets.retain(|_, b| refill(*b, now, rate, burst).tokens < burst);
        }
        let bucket = buckets.entry(identity.to_string()).or_insert(Bucket {
            tokens: self.burst,
            at: now,
        });
        let mut b = refill(*bucket, now, self.per_second, self.burst);
        let result = if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - b.tokens) / self.per_second))
        };
        *bucket = b;
        result
    }
}

fn refill(b: Bucket, now: Instant, per_second: f64, burst: f64) -> Bucket {
    let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
    Bucket {
        tokens: (b.tokens + elapsed * per_second).min(burst),
        at: now.max(b.at),
    }
}

#[cfg(test)]
mod tests {
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
    fn full_buckets_are_pruned_when_the_table_grows() {
        let limiter = RateLimiter::new(1000.0, 1);
        let t0 = Instant::now();
        for i in 0..=PRUNE_ABOVE {
            limiter.check(&format!("spiffe://x/{i}"), t0).unwrap();
        }
        let later = t0 + Duration::from_secs(1);
        limiter.check("spiffe://new", later).unwrap();
        assert_eq!(limiter.buckets.lock().unwrap().len(), 1);
    }
}
