//! Token buckets for the per-key limits (requests and tokens per minute). A bucket holds
//! up to one minute's allowance and refills continuously; usage may drive it below zero
//! (tokens are only known after the fact), which blocks the key until it refills.

use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct Bucket {
    capacity: f64,
    level: f64,
    per_second: f64,
    updated: Instant,
}

impl Bucket {
    pub fn per_minute(limit: u32, now: Instant) -> Self {
        let capacity = limit as f64;
        Self { capacity, level: capacity, per_second: capacity / 60.0, updated: now }
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

    /// Fails while the bucket is in debt.
    pub fn check_positive(&mut self, now: Instant) -> Result<(), Duration> {
        self.refill(now);
        if self.level > 0.0 {
            Ok(())
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
}
