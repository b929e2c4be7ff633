//! Throttles API-key guessing: each client IP may fail key checks `per_minute` times a
//! minute (a token bucket, so bursts up to that many); once out, every request from that
//! IP gets 429 with Retry-After until the bucket refills — before any database lookup, so
//! guessing costs the registry nothing either. Successful requests do not refill it.
//! The same throttle, counting every request ([`AuthThrottle::reads`]), bounds reads that
//! cost the database whether they succeed or not (receipt proofs).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Instant;

use crate::actors::rate_limit::Bucket;
use crate::actors::ServeError;

/// IPs tracked at most; beyond, buckets back to full are forgotten first.
const MAX_TRACKED: usize = 100_000;

pub struct AuthThrottle {
    per_minute: u32,
    /// What an IP out of its allowance sent too many of (in the 429's message).
    what: &'static str,
    buckets: Mutex<HashMap<IpAddr, Bucket>>,
}

impl AuthThrottle {
    pub fn new(per_minute: u32) -> Self {
        Self { per_minute, what: "requests with invalid API keys", buckets: Mutex::new(HashMap::new()) }
    }

    /// A throttle of `what` (every request counted with [`AuthThrottle::failed`]).
    pub fn reads(what: &'static str, per_minute: u32) -> Self {
        Self { per_minute, what, buckets: Mutex::new(HashMap::new()) }
    }

    /// Refuses an IP that has used up its failed attempts.
    pub fn check(&self, ip: Option<IpAddr>) -> Result<(), ServeError> {
        let (Some(ip), Ok(mut buckets)) = (ip, self.buckets.lock()) else { return Ok(()) };
        match buckets.get_mut(&ip).map(|b| b.has(1.0, Instant::now())) {
            Some(Err(retry_after)) => {
                Err(ServeError::RateLimited { what: format!("too many {} from {ip}", self.what), retry_after })
            }
            _ => Ok(()),
        }
    }

    /// Counts one failed key check (or one read) from `ip`.
    pub fn failed(&self, ip: Option<IpAddr>) {
        let (Some(ip), Ok(mut buckets)) = (ip, self.buckets.lock()) else { return };
        let now = Instant::now();
        if buckets.len() >= MAX_TRACKED {
            // Those back to full are forgotten; those blocked are kept, unless that still
            // leaves too many (addresses are cheap in IPv6): memory wins then.
            buckets.retain(|_, b| !b.is_full(now));
            if buckets.len() >= MAX_TRACKED {
                buckets.clear();
            }
        }
        buckets.entry(ip).or_insert_with(|| Bucket::per_minute(self.per_minute, now)).spend(1.0, now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ip_is_refused_after_its_failures_and_others_are_not() {
        let throttle = AuthThrottle::new(3);
        let (bad, good): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        for _ in 0..3 {
            assert!(throttle.check(Some(bad)).is_ok());
            throttle.failed(Some(bad));
        }
        match throttle.check(Some(bad)) {
            Err(ServeError::RateLimited { retry_after, .. }) => assert!(retry_after.as_secs() >= 1),
            other => panic!("expected a refusal, got {other:?}"),
        }
        assert!(throttle.check(Some(good)).is_ok());
        assert!(throttle.check(None).is_ok(), "no peer address: nothing to key on");
    }
}
