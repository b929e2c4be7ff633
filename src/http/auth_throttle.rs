//! Throttles API-key guessing: each client IP (IPv6: each /64) may fail key checks `per_minute` times a
//! minute (a token bucket, so bursts up to that many); once out, every request from that
//! IP gets 429 with Retry-After until the bucket refills — before any database lookup, so
//! guessing costs the registry nothing either. Successful requests do not refill it. An IP
//! has at most [`MAX_UNDER_WAY`] attempts under way at once, so that a burst of bad keys
//! sent together cannot all reach the lookup before the first failure counts.
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
/// Attempts one IP may have under way at once.
pub const MAX_UNDER_WAY: f64 = 256.0;

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

    /// A throttle of `what` (every request counted with [`AuthAttempt::failed`]).
    pub fn reads(what: &'static str, per_minute: u32) -> Self {
        Self { per_minute, what, buckets: Mutex::new(HashMap::new()) }
    }

    /// Refuses an IP that has used up its failed attempts, or that has
    /// [`MAX_UNDER_WAY`] attempts under way ([`AuthAttempt`]): requests sent together all
    /// passed before the first failure was counted, as many lookups of bad keys in one
    /// burst as the IP had connections (tens of thousands). A game's honest burst is far
    /// below the cap: an attempt is under way only while its key is looked up.
    pub fn check(&self, ip: Option<IpAddr>) -> Result<AuthAttempt<'_>, ServeError> {
        let (Some(ip), Ok(mut buckets)) = (ip.map(client_key), self.buckets.lock()) else {
            return Ok(AuthAttempt { throttle: self, ip: None });
        };
        let now = Instant::now();
        if let Some(bucket) = buckets.get_mut(&ip) {
            let refusal = match bucket.has(1.0, now) {
                Err(retry_after) => Some(retry_after),
                Ok(()) if bucket.held() >= MAX_UNDER_WAY => Some(std::time::Duration::from_secs(1)),
                Ok(()) => None,
            };
            if let Some(retry_after) = refusal {
                let what = format!("too many {} from {ip}", self.what);
                return Err(ServeError::RateLimited { what, retry_after });
            }
        }
        self.trim(&mut buckets, now);
        buckets.entry(ip).or_insert_with(|| Bucket::per_minute(self.per_minute, now)).hold(1.0);
        Ok(AuthAttempt { throttle: self, ip: Some(ip) })
    }

    /// Keeps the table within [`MAX_TRACKED`] addresses.
    fn trim(&self, buckets: &mut HashMap<IpAddr, Bucket>, now: Instant) {
        if buckets.len() >= MAX_TRACKED {
            // Those back to full are forgotten; those blocked are kept, unless that still
            // leaves too many (addresses are cheap in IPv6): memory wins then.
            buckets.retain(|_, b| !b.is_full(now));
            if buckets.len() >= MAX_TRACKED {
                buckets.clear();
            }
        }
    }

    /// Ends an attempt of `ip`: it no longer holds its unit, and a failure spends it.
    fn end(&self, ip: IpAddr, failed: bool) {
        let Ok(mut buckets) = self.buckets.lock() else { return };
        if let Some(bucket) = buckets.get_mut(&ip) {
            bucket.release(1.0);
            if failed {
                bucket.spend(1.0, Instant::now());
            }
        }
    }
}

/// What a client is counted by: its IPv4 address, or its IPv6 /64 (one subscriber's
/// network: an attacker holds a whole /64 and could take a fresh address per request).
pub fn client_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(std::net::Ipv6Addr::from(u128::from(v6) & !((1u128 << 64) - 1))),
        },
    }
}

/// An attempt [`AuthThrottle::check`] let through: [`AuthAttempt::failed`] counts it
/// against the IP (a bad key, or any read of a throttle that counts every one); dropped
/// otherwise, it costs nothing.
#[must_use = "an attempt counts only when it fails; drop it on success"]
pub struct AuthAttempt<'a> {
    throttle: &'a AuthThrottle,
    ip: Option<IpAddr>,
}

impl AuthAttempt<'_> {
    /// Counts this attempt against its IP.
    pub fn failed(mut self) {
        if let Some(ip) = self.ip.take() {
            self.throttle.end(ip, true);
        }
    }
}

impl Drop for AuthAttempt<'_> {
    fn drop(&mut self) {
        if let Some(ip) = self.ip.take() {
            self.throttle.end(ip, false);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(attempt: Result<AuthAttempt<'_>, ServeError>) -> bool {
        match attempt {
            Err(ServeError::RateLimited { retry_after, .. }) => retry_after.as_secs() >= 1,
            Err(other) => panic!("expected a refusal, got {other:?}"),
            Ok(_) => false,
        }
    }

    #[test]
    fn an_ip_is_refused_after_its_failures_and_others_are_not() {
        let throttle = AuthThrottle::new(3);
        let (bad, good): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        for _ in 0..3 {
            throttle.check(Some(bad)).expect("within the allowance").failed();
        }
        assert!(refused(throttle.check(Some(bad))));
        assert!(throttle.check(Some(good)).is_ok());
        assert!(throttle.check(None).is_ok(), "no peer address: nothing to key on");
    }

    #[test]
    fn ipv6_clients_are_counted_by_their_64_prefix() {
        let throttle = AuthThrottle::new(2);
        let ip = |s: &str| Some(s.parse::<IpAddr>().unwrap());
        throttle.check(ip("2001:db8:1:2::1")).unwrap().failed();
        throttle.check(ip("2001:db8:1:2:ffff::9")).unwrap().failed();
        assert!(refused(throttle.check(ip("2001:db8:1:2:abcd:1234:5678:9abc"))), "a fresh address of the same /64");
        assert!(throttle.check(ip("2001:db8:1:3::1")).is_ok(), "another /64");
        // An IPv4 client seen through an IPv6 socket is the IPv4 client.
        throttle.check(ip("10.1.1.1")).unwrap().failed();
        throttle.check(ip("::ffff:10.1.1.1")).unwrap().failed();
        assert!(refused(throttle.check(ip("10.1.1.1"))));
    }

    #[test]
    fn attempts_under_way_are_capped_and_successes_cost_nothing() {
        let throttle = AuthThrottle::new(3);
        let ip: IpAddr = "10.0.0.3".parse().unwrap();
        // A burst of bad keys at once, before any lookup ends: capped.
        let cap = MAX_UNDER_WAY as usize;
        let under_way: Vec<_> = (0..cap).map(|_| throttle.check(Some(ip)).expect("under the cap")).collect();
        assert!(refused(throttle.check(Some(ip))), "an attempt past the cap passed");
        // They succeed: nothing is spent.
        drop(under_way);
        for _ in 0..10 {
            drop(throttle.check(Some(ip)).expect("successes cost nothing"));
        }
        // Failures spend the allowance, whether they were under way together or not.
        let together: Vec<_> = (0..3).map(|_| throttle.check(Some(ip)).unwrap()).collect();
        together.into_iter().for_each(AuthAttempt::failed);
        assert!(refused(throttle.check(Some(ip))));
    }
}
