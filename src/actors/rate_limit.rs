//! Token buckets for the per-key limits (requests and tokens per minute). A bucket holds
//! up to one minute's allowance and refills continuously; usage may drive it below zero
//! (tokens are only known after the fact), which blocks the key until it refills. The
//! tokens a job may use are held apart while the job runs ([`Bucket::hold`]), and the
//! bucket admits only while its level is above what is held, so that requests sent
//! together cannot all find the budget whole. Holds are kept apart from the level so that
//! the level's floor, and a new share of the limit, never change what usage was charged.

use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct Bucket {
    capacity: f64,
    level: f64,
    /// Held for jobs running now ([`Bucket::hold`]); not part of `level`.
    held: f64,
    per_second: f64,
    updated: Instant,
}

impl Bucket {
    pub fn per_minute(limit: u32, now: Instant) -> Self {
        let capacity = limit as f64;
        Self { capacity, level: capacity, held: 0.0, per_second: capacity / 60.0, updated: now }
    }

    /// This server's share of a limit the network's `servers` enforce together: each admits
    /// `limit / servers` per minute, bursting to that (at least one, so a small limit never
    /// blocks everything). With the load spread evenly (a round-robin balancer), the
    /// network admits the limit.
    pub fn per_minute_share(limit: u32, servers: usize, now: Instant) -> Self {
        let share = limit as f64 / servers.max(1) as f64;
        // A limit of 0 admits nothing, on any number of servers.
        let capacity = if limit == 0 { 0.0 } else { share.max(1.0) };
        Self { capacity, level: capacity, held: 0.0, per_second: share / 60.0, updated: now }
    }

    /// The same bucket for another share, as full (in proportion) as it is now.
    pub fn reshared(&mut self, limit: u32, servers: usize, now: Instant) -> Self {
        self.refill(now);
        let mut next = Self::per_minute_share(limit, servers, now);
        if self.capacity > 0.0 {
            next.level = self.level / self.capacity * next.capacity;
        }
        // Holds are given back in the amounts held.
        next.held = self.held;
        next
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.updated).as_secs_f64();
        self.level = (self.level + dt * self.per_second).min(self.capacity);
        self.updated = now;
    }

    /// Takes `amount` if at least that much is available; else says how long to wait.
    pub fn take(&mut self, amount: f64, now: Instant) -> Result<(), Duration> {
        self.refill(now);
        if self.level >= amount {
            self.level -= amount;
            Ok(())
        } else {
            Err(self.wait_for(amount))
        }
    }

    /// Fails while the bucket is in debt, counting what is held for running jobs.
    pub fn check_positive(&mut self, now: Instant) -> Result<(), Duration> {
        self.refill(now);
        if self.level - self.held > 0.0 {
            Ok(())
        } else if self.level > 0.0 {
            // Only running jobs' holds stand in the way: they come back as the jobs end.
            Err(Duration::from_secs(1))
        } else {
            Err(self.wait_for(f64::MIN_POSITIVE))
        }
    }

    /// Succeeds when at least `amount` is available, without taking it.
    pub fn has(&mut self, amount: f64, now: Instant) -> Result<(), Duration> {
        self.refill(now);
        if self.level >= amount {
            Ok(())
        } else {
            Err(self.wait_for(amount))
        }
    }

    /// Whether the bucket is back to its full allowance.
    pub fn is_full(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.level >= self.capacity
    }

    /// Records usage, possibly going into debt.
    pub fn spend(&mut self, amount: f64, now: Instant) {
        self.refill(now);
        // Debt is capped at one hour of allowance, whatever a node claims.
        self.level = (self.level - amount.max(0.0)).max(-60.0 * self.capacity);
    }

    /// Holds `amount` for a job admitted now, however large (a request is admitted while
    /// the level is above what is held); its usage is charged by [`Bucket::spend`].
    pub fn hold(&mut self, amount: f64) {
        self.held += amount.max(0.0);
    }

    /// What [`Bucket::hold`] holds now.
    pub fn held(&self) -> f64 {
        self.held
    }

    /// Gives back what [`Bucket::hold`] held.
    pub fn release(&mut self, amount: f64) {
        self.held = (self.held - amount.max(0.0)).max(0.0);
    }

    fn wait_for(&self, amount: f64) -> Duration {
        if self.per_second <= 0.0 {
            return Duration::from_secs(60);
        }
        Duration::try_from_secs_f64(((amount - self.level) / self.per_second).max(0.0))
            .unwrap_or(Duration::from_secs(3600))
            .max(Duration::from_secs(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_block_then_refill() {
        let t0 = Instant::now();
        let mut b = Bucket::per_minute(2, t0);
        assert!(b.take(1.0, t0).is_ok());
        assert!(b.take(1.0, t0).is_ok());
        let wait = b.take(1.0, t0).unwrap_err();
        assert!((29..=31).contains(&wait.as_secs()), "{wait:?}");
        assert!(b.take(1.0, t0 + Duration::from_secs(31)).is_ok());
        let mut tokens = Bucket::per_minute(600, t0);
        tokens.spend(900.0, t0);
        assert!(tokens.check_positive(t0 + Duration::from_secs(20)).is_err());
        assert!(tokens.check_positive(t0 + Duration::from_secs(31)).is_ok());
    }

    /// Holds block admission while jobs run and come back whole; the usage charged meanwhile
    /// stays charged, however far past the debt floor the holds went, and a new share of
    /// the limit scales the level, not the holds.
    #[test]
    fn holds_block_while_held_and_never_write_off_usage() {
        let t0 = Instant::now();
        let mut b = Bucket::per_minute(1000, t0);
        b.hold(600.0);
        assert!(b.check_positive(t0).is_ok());
        b.hold(600.0);
        assert_eq!(b.check_positive(t0), Err(Duration::from_secs(1)), "blocked by holds alone");
        b.release(600.0);
        assert!(b.check_positive(t0).is_ok());
        // Eight holds of 16,000 on 2,000 a minute: the usage is past the floor (one hour).
        let mut small = Bucket::per_minute(2000, t0);
        for _ in 0..8 {
            small.hold(16_000.0);
            small.spend(16_000.0, t0);
        }
        for _ in 0..8 {
            small.release(16_000.0);
        }
        let wait = small.check_positive(t0).unwrap_err();
        assert!(wait >= Duration::from_secs(3000), "usage written off: {wait:?}");
        // Two servers become one: the level doubles, the hold is given back as held.
        let mut half = Bucket::per_minute_share(2000, 2, t0);
        half.hold(1500.0);
        let mut whole = half.reshared(2000, 1, t0);
        whole.release(1500.0);
        assert!(whole.is_full(t0));
    }

    #[test]
    fn a_share_admits_its_part_and_resharing_keeps_the_fill() {
        let t0 = Instant::now();
        let mut third = Bucket::per_minute_share(30, 3, t0);
        let admitted = (0..30).filter(|_| third.take(1.0, t0).is_ok()).count();
        assert_eq!(admitted, 10, "one of three servers admits a third of the minute's requests");
        // A tiny limit over many servers still admits one at a time.
        let mut tiny = Bucket::per_minute_share(2, 3, t0);
        assert!(tiny.take(1.0, t0).is_ok());
        let mut none = Bucket::per_minute_share(0, 1, t0);
        assert!(none.take(1.0, t0 + Duration::from_secs(600)).is_err(), "a zero limit admits nothing");
        // Half used, then the network shrinks to one server: half of the whole limit is left.
        let mut half = Bucket::per_minute_share(60, 2, t0);
        for _ in 0..15 {
            half.take(1.0, t0).unwrap();
        }
        let mut whole = half.reshared(60, 1, t0);
        let left = (0..60).filter(|_| whole.take(1.0, t0).is_ok()).count();
        assert_eq!(left, 30);
    }
}
