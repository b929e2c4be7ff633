//! How often a node's load reaches the Distributor. A node sends its load in heartbeats, and
//! each heartbeat would be one message in the Distributor's mailbox, which every node and
//! every job shares. An honest node sends one per heartbeat interval; a rogue one may send
//! as many as the frame limit lets through (thousands a second). The pacer passes at most
//! one load per `gap` and holds the newest one in between, so the Distributor sees the same
//! latest load at a bounded rate whatever the node sends.

use std::time::{Duration, Instant};

use crate::protocol::NodeLoad;

/// What to do with a load just received.
#[derive(Debug, PartialEq)]
pub enum Paced {
    /// Tell the Distributor now.
    Now(NodeLoad),
    /// Held as the newest load; when `flush_after` is set, this is the first one held since
    /// the last was told: call [`LoadPacer::flush`] after that long.
    Held { flush_after: Option<Duration> },
}

/// The newest load not yet told, and when the last one was.
#[derive(Debug)]
pub struct LoadPacer {
    gap: Duration,
    told_at: Option<Instant>,
    held: Option<NodeLoad>,
}

impl LoadPacer {
    /// At most one load per `gap`.
    pub fn new(gap: Duration) -> Self {
        Self { gap, told_at: None, held: None }
    }

    /// A load from the node at `now`.
    pub fn offer(&mut self, load: NodeLoad, now: Instant) -> Paced {
        match self.told_at {
            Some(at) if now.saturating_duration_since(at) < self.gap => {
                let first = self.held.replace(load).is_none();
                let flush_after = first.then(|| self.gap - now.saturating_duration_since(at));
                Paced::Held { flush_after }
            }
            _ => {
                self.told_at = Some(now);
                self.held = None;
                Paced::Now(load)
            }
        }
    }

    /// The load held since the last was told, if any, to tell now.
    pub fn flush(&mut self, now: Instant) -> Option<NodeLoad> {
        let load = self.held.take()?;
        self.told_at = Some(now);
        Some(load)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(running: usize) -> NodeLoad {
        NodeLoad { running, ..NodeLoad::default() }
    }

    #[test]
    fn a_flood_of_loads_reaches_the_distributor_once_per_gap_with_the_newest() {
        let gap = Duration::from_millis(250);
        let start = Instant::now();
        let mut pacer = LoadPacer::new(gap);
        assert_eq!(pacer.offer(load(1), start), Paced::Now(load(1)), "the first load goes at once");

        // A thousand more within the gap: one flush is scheduled, for the rest of the gap.
        let mut flushes = Vec::new();
        for i in 0..1_000 {
            match pacer.offer(load(2 + i), start + Duration::from_micros(100 * i as u64)) {
                Paced::Now(_) => panic!("load {i} passed within the gap"),
                Paced::Held { flush_after } => flushes.extend(flush_after),
            }
        }
        assert_eq!(flushes, vec![gap], "one flush, at the end of the gap");

        // The flush tells the newest load, once.
        let flushed_at = start + gap;
        assert_eq!(pacer.flush(flushed_at), Some(load(1_001)));
        assert_eq!(pacer.flush(flushed_at), None);

        // The gap counts again from the flush; after it, a load goes at once.
        assert!(matches!(pacer.offer(load(7), flushed_at + gap / 2), Paced::Held { flush_after: Some(_) }));
        assert_eq!(pacer.offer(load(8), flushed_at + gap), Paced::Now(load(8)));
        assert_eq!(pacer.flush(flushed_at + gap), None, "a load told at once leaves nothing held");
    }

    #[test]
    fn honest_heartbeats_pass_unheld() {
        let interval = Duration::from_secs(1);
        let mut pacer = LoadPacer::new(interval / 4);
        let start = Instant::now();
        for beat in 0..10u32 {
            // Jitter of up to half an interval early still passes.
            let at = start + interval * beat - if beat > 0 { interval / 2 } else { Duration::ZERO };
            assert_eq!(pacer.offer(load(beat as usize), at), Paced::Now(load(beat as usize)));
        }
    }
}
