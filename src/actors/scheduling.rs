//! Node selection, free of actors so it can be tested alone: power-of-two-choices over
//! `peak_ewma_latency × (outstanding_tokens + 1)`, with a penalty for recent failures so a
//! node that fails fast does not look fast and attract traffic. A slow peak fades toward
//! the network's average while the node sits idle, so a node shunned for one failure gets
//! a task again in time, and that task's latency is its new evidence. A node's record
//! outlives its session ([`NodeStats::inherit`]): reconnecting wipes no failure.

use std::time::{Duration, Instant};

use rand::Rng;

/// Time constant of the latency average.
const EWMA_TAU: Duration = Duration::from_secs(10);
/// How long a failure weighs on a node's cost (the penalty decays with this constant).
const FAILURE_DECAY: Duration = Duration::from_secs(15);
/// Cost multiplier right after a failure.
const FAILURE_PENALTY: f64 = 20.0;
/// Latency a failure counts as (ms per token).
const FAILURE_LATENCY_MS: f64 = 1000.0;
/// Latency assumed for a node that has not finished a task yet (ms per token).
pub const DEFAULT_MS_PER_TOKEN: f64 = 50.0;
/// Time constant with which an unobserved peak fades toward the network's average.
const STALE_PEAK_TAU: Duration = Duration::from_secs(20);

/// What the distributor knows about one node's performance and load.
#[derive(Debug, Clone)]
pub struct NodeStats {
    /// Peak-EWMA of milliseconds per generated token (`None` until the first task).
    pub latency_ms: Option<f64>,
    updated: Instant,
    pub in_flight: usize,
    pub outstanding_tokens: usize,
    pub capacity: usize,
    pub last_failure: Option<Instant>,
    pub completed: u64,
    pub failed: u64,
}

impl NodeStats {
    pub fn new(capacity: usize, now: Instant) -> Self {
        Self {
            latency_ms: None,
            updated: now,
            in_flight: 0,
            outstanding_tokens: 0,
            capacity,
            last_failure: None,
            completed: 0,
            failed: 0,
        }
    }

    /// Folds in one observation: peaks are taken at once, recoveries decay in.
    pub fn observe_latency(&mut self, ms_per_token: f64, now: Instant) {
        let sample = ms_per_token.max(0.0);
        self.latency_ms = Some(match self.latency_ms {
            None => sample,
            Some(old) if sample > old => sample,
            Some(old) => {
                let dt = now.saturating_duration_since(self.updated).as_secs_f64();
                let w = (-dt / EWMA_TAU.as_secs_f64()).exp();
                old * w + sample * (1.0 - w)
            }
        });
        self.updated = now;
    }

    /// A failure counts as a very slow completion (a peak the EWMA only slowly forgets),
    /// so a node cannot look fast by failing fast.
    pub fn record_failure(&mut self, now: Instant) {
        self.failed += 1;
        self.last_failure = Some(now);
        let peak = self.latency_ms.unwrap_or(DEFAULT_MS_PER_TOKEN).max(FAILURE_LATENCY_MS);
        self.observe_latency(peak, now);
    }

    /// Takes over what an earlier session of the same node key taught (a reconnect must
    /// not wipe a failure): the worse latency, the later failure, the counts.
    pub fn inherit(&mut self, earlier: &NodeStats) {
        if let Some(old) = earlier.latency_ms {
            if self.latency_ms.is_none_or(|now| old > now) {
                self.latency_ms = Some(old);
                self.updated = earlier.updated;
            }
        }
        self.last_failure = self.last_failure.max(earlier.last_failure);
        self.completed += earlier.completed;
        self.failed += earlier.failed;
    }

    /// The latency the node's cost counts now: a peak above `average` fades toward it
    /// while the node is idle and nothing new is observed (a fast node keeps its record; a
    /// slow one at work stays slow).
    pub fn current_latency(&self, average: f64, now: Instant) -> f64 {
        let Some(latency) = self.latency_ms else { return average };
        if latency <= average || self.in_flight > 0 {
            return latency;
        }
        let age = now.saturating_duration_since(self.updated).as_secs_f64();
        average + (latency - average) * (-age / STALE_PEAK_TAU.as_secs_f64()).exp()
    }

    pub fn has_room(&self) -> bool {
        self.in_flight < self.capacity
    }

    /// Lower is better.
    pub fn cost(&self, default_latency: f64, now: Instant) -> f64 {
        let latency = self.current_latency(default_latency, now).max(0.01);
        let mut cost = latency * (self.outstanding_tokens as f64 + 1.0);
        if let Some(at) = self.last_failure {
            let age = now.saturating_duration_since(at).as_secs_f64();
            cost *= 1.0 + FAILURE_PENALTY * (-age / FAILURE_DECAY.as_secs_f64()).exp();
        }
        cost
    }
}

/// Power of two choices: two distinct random candidates, the cheaper wins.
pub fn pick_two<R: Rng>(costs: &[(u64, f64)], rng: &mut R) -> Option<u64> {
    match costs.len() {
        0 => None,
        1 => Some(costs[0].0),
        n => {
            let a = rng.random_range(0..n);
            let mut b = rng.random_range(0..n - 1);
            if b >= a {
                b += 1;
            }
            let (x, y) = (costs[a], costs[b]);
            Some(if y.1 < x.1 { y.0 } else { x.0 })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn peak_ewma_jumps_up_and_decays_down() {
        let t0 = Instant::now();
        let mut s = NodeStats::new(4, t0);
        s.observe_latency(10.0, t0);
        s.observe_latency(100.0, t0 + Duration::from_secs(1));
        assert_eq!(s.latency_ms, Some(100.0));
        s.observe_latency(10.0, t0 + Duration::from_secs(11));
        let l = s.latency_ms.unwrap();
        assert!(l < 50.0 && l > 10.0, "{l}");
    }

    #[test]
    fn the_cheaper_node_wins_most_picks_and_failures_repel() {
        let now = Instant::now();
        let mut fast = NodeStats::new(8, now);
        fast.observe_latency(10.0, now);
        let mut slow = NodeStats::new(8, now);
        slow.observe_latency(40.0, now);
        let mut flaky = NodeStats::new(8, now);
        flaky.observe_latency(1.0, now);
        flaky.record_failure(now);
        let costs: Vec<(u64, f64)> = [&fast, &slow, &flaky]
            .iter()
            .enumerate()
            .map(|(i, s)| (i as u64, s.cost(DEFAULT_MS_PER_TOKEN, now)))
            .collect();
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let mut wins = [0; 3];
        for _ in 0..3000 {
            wins[pick_two(&costs, &mut rng).unwrap() as usize] += 1;
        }
        assert!(wins[0] > wins[1] && wins[1] > wins[2], "{wins:?}");
        assert!(pick_two(&[], &mut rng).is_none());
    }

    /// A node that failed once and got no task since is not shunned for ever: its peak
    /// fades toward the network's average (it used to stay at 1,000 ms per token until
    /// a completion, which a shunned node never gets). A fast node keeps its record.
    #[test]
    fn an_unobserved_peak_fades_toward_the_average_and_a_fast_record_stays() {
        let t0 = Instant::now();
        let mut failed = NodeStats::new(4, t0);
        failed.observe_latency(20.0, t0);
        failed.record_failure(t0);
        let at = |secs| t0 + Duration::from_secs(secs);
        assert_eq!(failed.current_latency(50.0, t0), FAILURE_LATENCY_MS);
        let later = failed.current_latency(50.0, at(20));
        assert!(later < FAILURE_LATENCY_MS && later > 50.0, "{later}");
        assert!(failed.current_latency(50.0, at(300)) < 50.1);
        // A node at work is judged by what it did last, however long its task takes.
        failed.in_flight = 1;
        assert_eq!(failed.current_latency(50.0, at(300)), FAILURE_LATENCY_MS);
        failed.in_flight = 0;
        // Without a failure's penalty left either, it costs what an average node does.
        assert!(failed.cost(50.0, at(300)) < 1.01 * NodeStats::new(4, t0).cost(50.0, at(300)));
        let mut fast = NodeStats::new(4, t0);
        fast.observe_latency(10.0, t0);
        assert_eq!(fast.current_latency(50.0, at(300)), 10.0);
    }

    /// A new session of a node key starts from what the earlier one taught.
    #[test]
    fn a_new_session_inherits_the_worse_record() {
        let t0 = Instant::now();
        let mut old = NodeStats::new(4, t0);
        old.observe_latency(30.0, t0);
        old.record_failure(t0);
        let mut new = NodeStats::new(4, t0);
        new.inherit(&old);
        assert_eq!((new.latency_ms, new.last_failure, new.failed), (Some(FAILURE_LATENCY_MS), Some(t0), 1));
        let mut fresh = NodeStats::new(4, t0);
        assert!(new.cost(50.0, t0) > 10.0 * fresh.cost(50.0, t0));
        // A faster record does not replace a slower one.
        let mut quick = NodeStats::new(4, t0);
        quick.observe_latency(5.0, t0);
        fresh.observe_latency(40.0, t0);
        fresh.inherit(&quick);
        assert_eq!(fresh.latency_ms, Some(40.0));
    }
}
